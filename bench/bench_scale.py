"""Scale benchmark: many simulated Jetsons in 4 hardware classes (real sshd per device).

    .venv/bin/python bench/bench_scale.py [--runs N] [--sizes 20,50] [--jobs 4] [--no-drift]
    .venv/bin/python bench/bench_scale.py --sizes 200          # the issue's size; heavy (see below)

For each N in --sizes, a fresh fleet of N devices, round-robin over 4 classes (AGX Orin JetPack 5,
AGX Orin JetPack 6, AGX Xavier JetPack 5, Orin NX JetPack 5), one project with every device as a
target, and in one run:
  - cold `doit -n J deploy`: wall time, controller CPU time (user+sys of doit and everything it
    waited for: resource.getrusage(RUSAGE_CHILDREN) around the subprocess; the devices' sshd and
    what they run are not the controller's children), engine builds counted on the devices
    (trtexec_sim's builds.log; expected 4 = one per class);
  - no-op `doit -n J deploy`, --runs times: median wall and CPU, TensorRT starts on the devices
    during the no-ops (trtexec runs and `import tensorrt`, the simulator's trt_invocations.log;
    expected 0), SSH logins per device (the devices' sshd logs; expected 1);
  - one-class drift (unless --no-drift): the Orin NX devices get JetPack 6 (their files rewritten
    in place, a new class), then `doit -n J deploy`: builds (expected 1), devices whose release
    changed (expected: only the upgraded ones), wall and CPU.
Baselines in the same run: `python -c "import doit"` and the no-op of a local-only project
(N=0); ratios of the no-op against it and per device. Every device is an sshd plus, while a
command runs, its session processes: 200 devices need ~200 sshd and file descriptors for each;
the benchmark reports what it could start (INFEASIBLE: ... when the fleet does not start).
Needs root and /usr/sbin/sshd (the simulator); otherwise prints SKIPPED and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _fleet_setup import active_release, as_users_run, fleet_project, run_with_fleets, sim_unsupported  # noqa: E402

ORIN_NX = ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
           ("nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"))


def profiles() -> dict:
    """The 4 classes of the fleet, and the Orin NX's JetPack 6 (the drift)."""
    from tests.fleet.sim import PROFILES
    nx = dataclasses.replace(PROFILES["orin-jp5"], name="orinnx-jp5", board_model=ORIN_NX[0],
                             compatible=ORIN_NX[1], description="Orin NX, JetPack 5.1.2")
    nx6 = dataclasses.replace(PROFILES["orin-jp6"], name="orinnx-jp6", board_model=ORIN_NX[0],
                              compatible=ORIN_NX[1], description="Orin NX, JetPack 6.2")
    return {"orin": PROFILES["orin-jp5"], "orin6": PROFILES["orin-jp6"], "xavier": PROFILES["xavier-jp5"],
            "orinnx": nx, "drift": nx6}


def timed_cpu(argv: list[str], env: dict, timeout: float = 3600) -> tuple[float, float, int, str]:
    """(wall s, controller CPU s, exit code, output) of one command run from the repo. CPU: user+sys
    of the process and the children it waited for (RUSAGE_CHILDREN delta; nothing else of ours
    is reaped meanwhile: the simulated sshd daemons live on)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.perf_counter()
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        out = proc.communicate()[0]
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def rng(xs: list[float]) -> str:
    return f"{med(xs):.2f} s [{min(xs):.2f}-{max(xs):.2f}]"


def start_fleet(tmp: Path, n: int, fleets: list):
    from tests.fleet.sim import Fleet
    profs = profiles()
    classes = ["orin", "orin6", "xavier", "orinnx"]
    sim = Fleet(tmp / f"fleet{n}")
    fleets.append(sim)
    names: dict[str, list[str]] = {c: [] for c in classes}
    for i in range(n):
        c = classes[i % len(classes)]
        name = f"{c}-{i:03d}"
        sim.add_device(name, profs[c])
        names[c].append(name)
    start = time.perf_counter()
    sim.start()
    return sim, names, time.perf_counter() - start


def bench_size(tmp: Path, n: int, args, fleets: list) -> dict:
    doit = [sys.executable, "-m", "doit", "-n", str(args.jobs), "deploy"]
    try:
        sim, by_class, started = start_fleet(tmp, n, fleets)
    except Exception as exc:  # noqa: BLE001 - the machine's limit is a result here
        return {"n": n, "infeasible": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    devices = [d for ds in by_class.values() for d in ds]
    p = fleet_project(tmp / f"proj{n}", sim, {d: {} for d in devices})
    r: dict = {"n": n, "start_fleet": started}
    wall, cpu, rc, out = timed_cpu(doit, p.env)
    if rc != 0:
        raise AssertionError(f"cold deploy of {n} devices exited {rc}:\n{out[-3000:]}")
    r["cold"] = (wall, cpu)
    r["cold_builds"] = sum(len(sim.builds(d)) for d in devices)
    r["served"] = sum(active_release(sim, d) is not None for d in devices)

    trt0 = {d: len(sim.trt_invocations(d)) for d in devices}
    logins0 = {d: sim.logins(d) for d in devices}
    walls, cpus = [], []
    for _ in range(args.runs):
        wall, cpu, rc, out = timed_cpu(doit, p.env)
        if rc != 0:
            raise AssertionError(f"no-op deploy of {n} devices exited {rc}:\n{out[-3000:]}")
        walls.append(wall)
        cpus.append(cpu)
    time.sleep(0.5)  # sshd logs lag a little
    r["noop"] = (walls, cpus)
    r["noop_trt"] = sum(len(sim.trt_invocations(d)) - trt0[d] for d in devices)
    per_dev = [(sim.logins(d) - logins0[d]) / args.runs for d in devices]
    r["noop_logins"] = (statistics.mean(per_dev), max(per_dev))

    if not args.no_drift:
        drifted = by_class["orinnx"]
        before = {d: active_release(sim, d) for d in devices}
        builds0 = sum(len(sim.builds(d)) for d in devices)
        for d in drifted:
            sim.upgrade(d, profiles()["drift"])
        wall, cpu, rc, out = timed_cpu(doit, p.env)
        if rc != 0:
            raise AssertionError(f"drift deploy of {n} devices exited {rc}:\n{out[-3000:]}")
        changed = [d for d in devices if active_release(sim, d) != before[d]]
        r["drift"] = {"wall": wall, "cpu": cpu, "builds": sum(len(sim.builds(d)) for d in devices) - builds0,
                      "upgraded": len(drifted), "changed": len(changed),
                      "changed_not_upgraded": sorted(set(changed) - set(drifted))}
    sim.stop()
    return r


def baseline_local(tmp: Path, runs: int, jobs: int) -> tuple[list, list]:
    from kiln_project import Project
    root = tmp / "proj-local"
    root.mkdir()
    p = Project(root)
    argv = [sys.executable, "-m", "doit", "-n", str(jobs), "deploy"]
    timed_cpu(argv, p.env)
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu, rc, out = timed_cpu(argv, p.env)
        if rc != 0:
            raise AssertionError(f"local no-op exited {rc}:\n{out[-2000:]}")
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus


def report(r: dict, local: tuple[list, list]) -> list[str]:
    n = r["n"]
    if "infeasible" in r:
        return [f"INFEASIBLE: {n} simulated devices could not be started here: {r['infeasible']}"]
    cw, cc = r["cold"]
    nw, nc = r["noop"]
    lw, lc = local
    lines = [
        f"N={n} (4 classes; fleet started in {r['start_fleet']:.1f} s)",
        f"  cold deploy: wall {cw:.1f} s, controller CPU {cc:.1f} s, builds counted on the devices {r['cold_builds']} "
        f"(expected 4, naive {n}), serving {r['served']}/{n}",
        f"  no-op: wall {rng(nw)}, controller CPU {rng(nc)}; {med(nw) / med(lw):.1f}x / {med(nc) / med(lc):.1f}x "
        f"the local-only no-op; {1000 * med(nw) / n:.0f} ms wall, {1000 * med(nc) / n:.0f} ms CPU per device",
        f"  no-op on the devices: TensorRT starts {r['noop_trt']} (expected 0), SSH logins per device "
        f"{r['noop_logins'][0]:.2f} mean, {r['noop_logins'][1]:.2f} max",
    ]
    ok = r["cold_builds"] == 4 and r["noop_trt"] == 0
    summary = (f"summary: N={n}: cold {cw:.1f} s wall / {cc:.1f} s CPU, builds {r['cold_builds']} (expect 4); "
               f"no-op {rng(nw)} wall / {med(nc):.2f} s CPU ({med(nw) / med(lw):.1f}x local-only), "
               f"TensorRT starts {r['noop_trt']} (expect 0)")
    if "drift" in r:
        d = r["drift"]
        lines.append(f"  one-class drift ({d['upgraded']} Orin NX -> JetPack 6): wall {d['wall']:.1f} s "
                     f"({d['wall'] / cw:.2f}x cold), CPU {d['cpu']:.1f} s, builds {d['builds']} (expected 1), releases "
                     f"changed {d['changed']} (expected {d['upgraded']}; others: {d['changed_not_upgraded'] or 'none'})")
        ok = ok and d["builds"] == 1 and not d["changed_not_upgraded"] and d["changed"] == d["upgraded"]
        summary += (f"; drift of {d['upgraded']}: {d['wall']:.1f} s wall / {d['cpu']:.1f} s CPU, builds {d['builds']} "
                    f"(expect 1), redeployed {d['changed']} of {n}")
    return lines + [summary + f" -> {'OK' if ok else 'MISSED'}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 3)))
    ap.add_argument("--sizes", default="20,50", help="comma-separated device counts (default 20,50; the issue asks 200)")
    ap.add_argument("--jobs", type=int, default=4, help="doit -n (default 4)")
    ap.add_argument("--no-drift", action="store_true", help="skip the one-class drift")
    args = ap.parse_args(argv)
    as_users_run()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(f"== scale benchmark: simulated Jetsons in 4 classes over SSH, sizes {sizes}, {args.runs} no-op runs, "
          f"doit -n {args.jobs}, {os.cpu_count()} CPUs ==")
    reason = sim_unsupported()
    if reason:
        print(f"SKIPPED: simulated fleet unavailable: {reason}")
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 200 sshd + their pipes

    def body(tmp: Path, fleets: list) -> None:
        py = sys.executable
        imp = [timed_cpu([py, "-c", "import doit"], os.environ.copy())[0] for _ in range(args.runs)]
        local = baseline_local(tmp, args.runs, args.jobs)
        print(f"baseline python -c 'import doit': {med(imp) * 1000:.0f} ms; local-only no-op deploy: wall "
              f"{rng(local[0])}, CPU {rng(local[1])}", flush=True)
        for n in sizes:
            r = bench_size(tmp, n, args, fleets)
            print("\n".join(report(r, local)), flush=True)
            for sim in fleets:
                sim.stop()
    return run_with_fleets("scale", body)


if __name__ == "__main__":
    sys.exit(main())
