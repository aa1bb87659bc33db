"""Fleet benchmark over simulated Jetsons (real sshd per device, tests/fleet/sim.py).

    .venv/bin/python bench/bench_fleet.py [--runs N] [--sizes 1,5,20] [--mixed 20] [--profile]

In one run, with medians over --runs and ratios against baselines measured in the same run:
  1. for each N in --sizes (N identical devices, profile orin-jp5 = one hardware class): a fresh
     project (temp dir, tiny model, TensorRT backend over SSH), one cold `doit -n 4 deploy`
     (timed once, for context), then the no-op `doit -n 4 deploy`: wall time and SSH logins
     per device counted on the device side (sshd log). Target: the 20-device no-op <= 3 s with
     <= 1 connection per device.
     Baselines: `python -c "import doit"` and the no-op deploy of a local-only fleet (N=0).
  2. build count vs a naive one-build-per-device: --mixed devices over 3 profiles (orin-jp5,
     orin-jp6, xavier-jp5), builds counted on the devices (trtexec_sim's builds.log) after
     the first deploy: "builds: K vs naive N".
  Where the no-op of the largest N goes, printed when it is slower than the target (scaled to N):
     an in-process run with the uptodate checks (fingerprint Probe, EngineCheck, DeployCheck)
     timed; --profile adds cProfile's top entries and the import time of the dodo file.
Needs root and /usr/sbin/sshd (the simulator); otherwise prints SKIPPED and exits 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

TARGET_SECONDS = 3.0
TARGET_SIZE = 20
MIXED_PROFILES = ("orin-jp5", "orin-jp6", "xavier-jp5")

from _fleet_setup import as_users_run, run_with_fleets, median_time, settle_logins, start_fleet  # noqa: E402  (shared with bench_scope.py)


def bench_size(tmp: Path, n: int, runs: int, fleets: list, profile: str | None) -> dict:
    """profile: None, "checks" (if the no-op misses the target) or "full" (always, with cProfile)."""
    from test_fleet import fleet_project
    sim, names = start_fleet(tmp / f"fleet{n}", ["orin-jp5"] * n, fleets)
    root = tmp / f"proj{n}"
    root.mkdir()
    p = fleet_project(root, sim, {name: {} for name in names})
    start = time.perf_counter()
    cold = p.doit("-n", "4", "deploy")
    cold_s = time.perf_counter() - start
    builds = sum(len(sim.builds(x)) for x in names)
    before = settle_logins(sim, names, {x: 1 for x in names})
    noop, outs = median_time(lambda: p.doit("-n", "4", "deploy"), runs)
    ran = set().union(*(r.ran() for r in outs))
    after = settle_logins(sim, names, {x: before[x] + runs for x in names})
    per_dev = [(after[x] - before[x]) / runs for x in names]
    report = None
    # the target's per-device budget (3 s / 20), floored at 1 s for small N (interpreter start-up)
    if profile == "full" or (profile == "checks" and noop > max(1.0, TARGET_SECONDS * n / TARGET_SIZE)):
        report = profile_noop(p, full=profile == "full")
    sim.stop()
    return {"n": n, "cold": cold_s, "noop": noop, "builds": builds, "ran": ran, "profile": report,
            "conn_mean": statistics.mean(per_dev), "conn_max": max(per_dev), "cold_ran": len(cold.ran())}


def bench_mixed(tmp: Path, n: int, fleets: list) -> dict:
    from test_fleet import fleet_project
    profiles = [MIXED_PROFILES[i % len(MIXED_PROFILES)] for i in range(n)]
    sim, names = start_fleet(tmp / "fleet-mixed", profiles, fleets)
    root = tmp / "proj-mixed"
    root.mkdir()
    p = fleet_project(root, sim, {name: {} for name in names})
    start = time.perf_counter()
    run = p.doit("-n", "4", "deploy")
    cold_s = time.perf_counter() - start
    builds = sum(len(sim.builds(x)) for x in names)
    sim.stop()
    return {"n": n, "k": len(set(profiles)), "builds": builds, "cold": cold_s,
            "engines": len(run.ran_group("engine"))}


def baseline_local(tmp: Path, runs: int) -> float:
    from kiln_project import Project
    root = tmp / "proj-local"
    root.mkdir()
    p = Project(root)
    p.doit("-n", "4", "deploy")
    return median_time(lambda: p.doit("-n", "4", "deploy"), runs)[0]


PROFILE_CODE = textwrap.dedent("""
    import cProfile, pstats, sys, time, io, collections, os, sysconfig
    REPO, SITE = os.getcwd(), sysconfig.get_paths()["purelib"] + "/"
    from doit.doit_cmd import DoitMain
    from doit.cmd_base import DodoTaskLoader
    import tasks.fleet as fl
    timings = collections.defaultdict(list)
    def wrap(name, label):
        orig = getattr(fl, name)
        def timed(*args):
            t0 = time.perf_counter()
            try:
                return orig(*args)
            finally:
                timings[label].append(time.perf_counter() - t0)
        setattr(fl, name, timed)  # the task creators' lambdas look it up when doit calls them
    wrap("fingerprint_is_current", "fingerprint (uptodate)")
    wrap("deploy_is_current", "deploy (uptodate)")
    wrap("engine_is_current", "engine (uptodate)")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    rc = DoitMain(DodoTaskLoader()).run(["-n", "4", "deploy"])
    prof.disable()
    total = time.perf_counter() - t0
    print("@@ in-process doit run: %.3f s (rc %s)" % (total, rc))
    for label, xs in timings.items():
        print("@@ %-30s n=%3d  sum %.3f s  mean %.3f s  max %.3f s" % (label, len(xs), sum(xs),
              sum(xs) / len(xs), max(xs)))
    checks = sum(sum(xs) for xs in timings.values())
    print("@@ uptodate checks: %.3f s of %.3f s (%.0f%%), evaluated one by one in doit's main thread "
          "(-n 4 parallelises actions only)" % (checks, total, 100 * checks / total))
    if %(top)d:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(%(top)d)
        print("@@ cProfile (cumulative, wall incl. waits of the main thread):")
        for line in s.getvalue().splitlines():
            if line.strip() and not line.startswith(("   Ordered", "   List reduced")):
                print("@@ " + line.replace(str(REPO) + "/", "").replace(SITE, "")[:130])
""")


def profile_noop(p, full: bool) -> list[str]:
    """Where a no-op's time goes: one in-process `doit -n 4 deploy` with the uptodate checks timed
    (doit evaluates them one after another in its main thread, even with -n 4), plus, if `full`,
    cProfile's top entries and the import time of the dodo file."""
    py, env, out = sys.executable, p.env, []
    proc = subprocess.run([py, "-c", PROFILE_CODE.replace("%(top)d", "22" if full else "0")], cwd=REPO,
                          env=env, capture_output=True, text=True)
    lines = [line[3:] for line in proc.stdout.splitlines() if line.startswith("@@ ")]
    out += lines
    if proc.returncode:
        out.append(f"profile run failed (exit {proc.returncode}): {proc.stderr[-500:]}")
    if full:
        proc = subprocess.run([py, "-X", "importtime", "-c", "import dodo"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        rows = []  # (cumulative us, depth, module)
        for line in proc.stderr.splitlines():
            if line.startswith("import time:") and line.count("|") == 2:
                _, cum, name = line[len("import time:"):].split("|")
                if cum.strip().isdigit():
                    rows.append((int(cum), (len(name) - len(name.lstrip()) - 1) // 2, name.strip()))
        top = sum(us for us, depth, _ in rows if depth == 0)
        heavy = sorted(((us, name) for us, depth, name in rows if depth <= 3 and name not in ("dodo", "tasks")),
                       reverse=True)[:8]
        out.append(f"import dodo (doit + tasks + kiln, no torch): {top / 1e6:.3f} s; heaviest: "
                   + ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in heavy))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 5)))
    ap.add_argument("--sizes", default="1,5,20", help="comma-separated device counts (default 1,5,20)")
    ap.add_argument("--mixed", type=int, default=None,
                    help="devices of the mixed 3-class fleet for the build count (default: largest size, 0 = skip)")
    ap.add_argument("--profile", action="store_true", help="profile the no-op of the largest size")
    args = ap.parse_args(argv)
    as_users_run()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    mixed = max(sizes + [0]) if args.mixed is None else args.mixed
    if mixed and mixed < len(MIXED_PROFILES):
        mixed = len(MIXED_PROFILES)

    print(f"== fleet benchmark: simulated Jetsons over SSH, medians of {args.runs} runs, "
          f"{os.cpu_count()} CPUs ==")
    from tests.fleet.sim import unsupported_reason
    reason = unsupported_reason()
    if reason:
        print(f"SKIPPED: simulated fleet unavailable: {reason}")
        return 0

    py = sys.executable

    def body(tmp: Path, fleets: list) -> None:
        imp = median_time(lambda: subprocess.run([py, "-c", "import doit"], cwd=REPO, check=True), args.runs)[0]
        local = baseline_local(tmp, args.runs)
        results = []
        biggest = max(sizes, default=0)
        for n in sizes:
            prof = ("full" if args.profile else "checks") if n == biggest else None
            results.append(bench_size(tmp, n, args.runs, fleets, prof))
        mix = bench_mixed(tmp, mixed, fleets) if mixed else None

        print(f"baseline python -c 'import doit'            {imp * 1000:7.0f} ms")
        print(f"baseline no-op deploy, local-only fleet N=0 {local * 1000:7.0f} ms  "
              f"({local / imp:4.1f}x import doit)")
        print()
        print(f"{'N':>3}  {'cold deploy':>11}  {'no-op':>8}  {'vs import':>9}  {'vs N=0':>7}  "
              f"{'conn/dev (max)':>14}  {'builds':>6}  note")
        for r in results:
            note = "" if not r["ran"] else f"no-op ran: {', '.join(sorted(r['ran']))[:40]}"
            print(f"{r['n']:>3}  {r['cold']:>9.1f} s  {r['noop'] * 1000:>5.0f} ms  {r['noop'] / imp:>8.1f}x  "
                  f"{r['noop'] / local:>6.1f}x  {r['conn_mean']:>6.2f} ({r['conn_max']:.2f})  "
                  f"{r['builds']:>6}  {note}")
        print()
        for r in results:
            if r["n"] == TARGET_SIZE:
                ok = r["noop"] <= TARGET_SECONDS and r["conn_max"] <= 1.0 and not r["ran"]
                print(f"target: {TARGET_SIZE}-device no-op <= {TARGET_SECONDS:.0f} s and <= 1 connection/device: "
                      f"{r['noop']:.2f} s, {r['conn_max']:.2f} conn/dev max -> {'OK' if ok else 'MISSED'}")
        if not any(r["n"] == TARGET_SIZE for r in results):
            print(f"target: {TARGET_SIZE}-device no-op <= {TARGET_SECONDS:.0f} s: not measured (sizes {sizes})")
        for r in results:
            print(f"builds (1 class, N={r['n']}): {r['builds']} vs naive {r['n']} "
                  f"({r['builds'] / r['n']:.2f}x)" if r["n"] else "")
        if mix:
            print(f"builds: {mix['builds']} vs naive {mix['n']} ({mix['builds'] / mix['n']:.2f}x)  "
                  f"[{mix['n']} devices in {mix['k']} classes ({', '.join(MIXED_PROFILES)}); "
                  f"cold deploy {mix['cold']:.1f} s; expected {mix['k']}: "
                  f"{'OK' if mix['builds'] == mix['k'] else 'MISSED'}]")
        for r in results:
            if r["profile"]:
                print(f"\nwhere the {r['n']}-device no-op goes (one in-process run, uptodate checks timed):")
                for line in r["profile"]:
                    print("  " + line)
    return run_with_fleets("fleet", body)


if __name__ == "__main__":
    sys.exit(main())
