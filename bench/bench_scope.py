"""Scope benchmark: a command touches only what it names (issue: per-target scope).

    .venv/bin/python bench/bench_scope.py [--sizes 1,12,50] [--repeats 3] [--runs 7]
        [--device-profile orin-jp5|cpu] [--builder] [--list-targets 200] [--only deploy-one,list,noop]
        [--strict]

Everything through the doit CLI (`python -m doit ...` with KILN_TARGETS / KILN_ARTIFACTS), medians
and ranges over repeats, ratios against baselines measured in the same run; every benchmark ends
with a `summary:` line (PASS/FAIL against its target), which bench/run.py repeats.

  1. deploy-one: for each N in --sizes, N identical simulated devices (tests/fleet/sim.py: one real
     sshd each; --device-profile orin-jp5 = TensorRT built on the device, cpu = onnxruntime), all
     deployed once with `doit -n 4 deploy`; then --repeats times: retrain (new weights in the
     checkpoint, so a new ONNX and a new engine are needed) and time the first `doit deploy:<dev-00>`
     (all sizes set up first and kept running, then the repeats interleaved across the sizes).
     (a) devices contacted = devices whose sshd log shows a new login during that command.
         Target: only dev-00 at every size (+ the designated builder of its class with --builder,
         which makes the last device `builder = true`); every other device keeps its active release.
     (b) wall time, median [range] per size; ratio largest / smallest size (50 / 1). Target <= 1.2x.
     The time to start the N sshd processes is printed; if N cannot start here, smaller N are tried
     and the output says INFEASIBLE.
  2. list: `doit list` with a fleet file of --list-targets SSH targets that point at a local TCP
     listener which never answers (any contact would show as a connection, and would hang until
     connect_timeout): median wall time and ratio to `python -c "import doit"` (interleaved).
     Target: <= 0.5 s and 0 connections.
  3. noop: no-op `doit deploy:local` on the tiny model (after one real deploy) vs
     `python -c "import doit"` (interleaved): median ratio. Target <= 1.3x.
Exit code: 1 if a benchmark could not run (or, with --strict, if a target is missed), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _fleet_setup import (as_users_run, stop_fleets, REPO, active_release, fleet_project, fmt_ms, fmt_s, interleaved, retrain,
                          settle_logins, sim_unsupported, spread, start_fleet)

DEPLOY_RATIO_TARGET = 1.2
LIST_TARGET_S = 0.5
NOOP_RATIO_TARGET = 1.3
PY = sys.executable
IMPORT_DOIT = [PY, "-c", "import doit"]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- 1. doit deploy:<one> in N-device fleets -------------------------------------------------------

def start_largest_feasible(tmp: Path, n: int, floor: int, profile: str, fleets: list, attempts: int = 2):
    """Start n devices (`attempts` tries, each with the simulator's own retries: a start that fails
    on a busy shared machine is usually transient); if n cannot start here, try smaller fleets (never
    down to `floor`, the previous size). Returns (sim, names, seconds to start, [(size, why)] failed)."""
    tried = []
    while True:
        for attempt in range(attempts):
            t0 = time.perf_counter()
            try:
                sim, names = start_fleet(tmp / f"fleet{n}-{len(tried)}-{attempt}", [profile] * n, fleets,
                                         prefix="dev")
                return sim, names, time.perf_counter() - t0, tried
            except RuntimeError as exc:
                lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
                why = lines[0][:100] + (f" ... {lines[-1][:160]}" if len(lines) > 1 else "")
                print(f"note: starting {n} simulated devices failed (attempt {attempt + 1}/{attempts}): {why}",
                      flush=True)
        tried.append((n, why))
        smaller = n * 3 // 4
        if smaller <= floor or smaller == n:
            raise RuntimeError(f"cannot start {n} simulated devices here: {why}")
        n = smaller


def setup_size(tmp: Path, n: int, floor: int, args, fleets: list) -> dict:
    """N started devices, all deployed once with `doit -n 4 deploy`."""
    sim, names, start_s, tried = start_largest_feasible(tmp, n, floor, args.device_profile, fleets)
    for size, why in tried:
        print(f"INFEASIBLE: {size} simulated devices could not start here ({why}); using {len(names)}")
    n = len(names)
    opts = {"backend": "onnxruntime"} if args.device_profile == "cpu" else {}
    devices = {x: dict(opts) for x in names}
    allowed = {names[0]}
    if args.builder and n > 1:
        devices[names[-1]]["builder"] = True
        allowed.add(names[-1])
    p = fleet_project(tmp / f"proj{n}", sim, devices)
    t0 = time.perf_counter()
    p.doit("-n", "4", "deploy")
    cold_s = time.perf_counter() - t0
    print(f"N={n:>2}: {n} sshd started in {start_s:.2f} s; full `doit -n 4 deploy` (cold) {cold_s:.1f} s",
          flush=True)
    return {"n": n, "requested": tried[0][0] if tried else n, "start": start_s, "cold": cold_s, "sim": sim,
            "names": names, "project": p, "target": names[0], "allowed": allowed, "samples": [], "rounds": []}


def deploy_round(st: dict, r: int) -> None:
    """Retrain, then time the first `doit deploy:<target>` and see who was contacted."""
    sim, names, target, p = st["sim"], st["names"], st["target"], st["project"]
    retrain(p, 0.01 * (r + 1))
    time.sleep(0.3)  # sshd logs of the previous command have landed (retrain alone takes seconds)
    logins = {x: sim.logins(x) for x in names}
    before = {x: active_release(sim, x) for x in names}
    builds = {x: len(sim.builds(x)) for x in names}
    t0 = time.perf_counter()
    run = p.doit(f"deploy:{target}")
    wall = time.perf_counter() - t0
    after_logins = settle_logins(sim, names, {x: logins[x] + (x == target) for x in names})
    after = {x: active_release(sim, x) for x in names}
    contacted = [x for x in names if after_logins[x] > logins[x]]
    changed = [x for x in names if x != target and after[x] != before[x]]
    built = {x: len(sim.builds(x)) - builds[x] for x in names if len(sim.builds(x)) > builds[x]}
    rnd = {"wall": wall, "contacted": contacted, "others_changed": changed,
           "target_changed": after[target] != before[target],
           "ran": sorted({t.split(":")[0] for t in run.ran()}), "built": built}
    st["rounds"].append(rnd)
    st["samples"].append(wall)
    shown = ", ".join(contacted[:4]) + (f", ... (+{len(contacted) - 4})" if len(contacted) > 4 else "")
    print(f"N={st['n']:>2} repeat {r + 1}: deploy:{target} {wall:6.2f} s; contacted {len(contacted):>2} [{shown}]; "
          f"target release {'changed' if rnd['target_changed'] else 'UNCHANGED'}; others changed: "
          f"{len(changed)}; device builds: {sum(built.values())} {sorted(built)}; ran: {','.join(rnd['ran'])}",
          flush=True)


def bench_deploy_one(tmp: Path, sizes: list[int], args, fleets: list) -> list[dict]:
    """All sizes set up first, then the repeats interleaved across sizes (round r: every size once,
    the order reversed every other round), so a noisy spell of the machine hits every size alike."""
    states, floor = [], 0
    for n in sizes:
        states.append(setup_size(tmp, n, floor, args, fleets))
        floor = states[-1]["n"]
    for r in range(args.repeats):
        for st in (states if r % 2 == 0 else states[::-1]):
            deploy_round(st, r)
    for st in states:
        st["sim"].stop()
        rounds = st["rounds"]
        st.update({"contacted_max": max(len(x["contacted"]) for x in rounds),
                   "extra": sorted(set().union(*(set(x["contacted"]) - st["allowed"] for x in rounds))),
                   "others_changed": sorted(set().union(*(set(x["others_changed"]) for x in rounds))),
                   "target_updated": all(x["target_changed"] for x in rounds)})
    return states


def report_deploy_one(results: list[dict], builder: bool) -> list[str]:
    out = []
    contacts = ", ".join(f"N={r['n']}: {r['contacted_max']}" for r in results)
    ok_scope = all(not r["extra"] and not r["others_changed"] and r["target_updated"] for r in results)
    allowed = "the target + its class's designated builder" if builder else "the target only"
    unchanged = "yes" if not any(r["others_changed"] for r in results) else \
        f"NO ({sum(len(r['others_changed']) for r in results)} devices)"
    updated = "yes" if all(r["target_updated"] for r in results) else "NO"
    out.append(f"summary: deploy:<one> devices contacted (max over repeats) {contacts}; others' release unchanged: "
               f"{unchanged}; target updated: {updated} [target: {allowed}] -> {verdict(ok_scope)}")
    small, big = min(results, key=lambda r: r["n"]), max(results, key=lambda r: r["n"])
    walls = ", ".join(f"N={r['n']} {fmt_s(r['samples'])}" for r in results)
    if big is small:
        out.append(f"summary: deploy:<one> wall median [range] {walls}; one size only: no ratio "
                   f"[target {big['n']}/1 <= {DEPLOY_RATIO_TARGET}x] -> FAIL (not measured)")
        return out
    ratio = spread(big["samples"])[0] / spread(small["samples"])[0]
    paired = [b / a for a, b in zip(small["samples"], big["samples"])]  # the same round: same machine noise
    label = f"{big['n']}/{small['n']}" + ("" if (small["n"], big["n"]) == (1, 50) else " (not 50/1)")
    out.append(f"summary: deploy:<one> wall median [range] {walls}; ratio {label} = {ratio:.2f}x "
               f"(per-round {min(paired):.2f}-{max(paired):.2f}x) [target <= {DEPLOY_RATIO_TARGET}x] -> "
               f"{verdict(ratio <= DEPLOY_RATIO_TARGET)}")
    return out


# -- 2. doit list with a big fleet file ---------------------------------------------------------------

class SilentListener:
    """A TCP port that accepts connections and never says a word (an SSH client would wait for the
    banner until its connect_timeout); counts the connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("0.0.0.0", 0))  # every loopback address 127.x.y.z reaches it (one per target)
        self.sock.listen(1024)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for c in self._held:
            c.close()
        self.sock.close()


def list_project(root: Path, n: int, port: int):
    from kiln_project import Project
    root.mkdir(parents=True, exist_ok=True)
    p = Project(root)
    (root / "known_hosts").write_text("")
    (root / "ssh_config").write_text("")
    text = p.fleet.read_text().split("[targets.local]")[0]
    for i in range(n):
        # one device, one target: each its own loopback address, all on the silent port
        fields = {"transport": "ssh", "backend": "tensorrt", "host": f"127.0.{i // 250}.{i % 250 + 1}", "port": port,
                  "user": "root",
                  "models": ["tiny"], "groups": [f"line-{i % 4}"], "install_dir": "/srv/kiln",
                  "ssh_config": str(root / "ssh_config"), "known_hosts": str(root / "known_hosts"),
                  "connect_timeout": 3}
        text += f"\n[targets.jetson-{i:03d}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    p.fleet.write_text(text)
    return p


def bench_list(tmp: Path, n: int, runs: int) -> list[str]:
    listener = SilentListener()
    try:
        p = list_project(tmp / "list", n, listener.port)
        probe = subprocess.run([PY, "-m", "doit", "list"], cwd=REPO, env=p.env, capture_output=True, text=True,
                               timeout=60)
        if probe.returncode or "deploy" not in probe.stdout:
            raise RuntimeError(f"doit list with {n} targets failed (exit {probe.returncode}):\n"
                               f"{(probe.stdout + probe.stderr)[-1500:]}")
        times = interleaved({"import": (IMPORT_DOIT, None), "list": ([PY, "-m", "doit", "list"], p.env)}, runs)
        time.sleep(0.3)
        conns = listener.connections
    except subprocess.TimeoutExpired:
        return [f"summary: doit list, {n} targets: HUNG (> 60 s; contacted {listener.connections} times) "
                f"[target <= {LIST_TARGET_S} s, 0 connections] -> FAIL"]
    finally:
        listener.close()
    med, imp = statistics.median(times["list"]), statistics.median(times["import"])
    ratios = [a / b for a, b in zip(times["list"], times["import"])]
    print(f"python -c 'import doit'            {fmt_ms(times['import'])}  (baseline)")
    print(f"doit list, {n} SSH targets        {fmt_ms(times['list'])}; connections to the targets: {conns}")
    ok = med <= LIST_TARGET_S and conns == 0
    return [f"summary: doit list, {n} targets: {med * 1000:.0f} ms = {med / imp:.2f}x import doit "
            f"({imp * 1000:.0f} ms; per-round ratio {min(ratios):.2f}-{max(ratios):.2f}x), {conns} connections "
            f"[target <= {LIST_TARGET_S} s, 0 connections] -> {verdict(ok)}"]


# -- 3. no-op doit deploy:local ----------------------------------------------------------------------

def bench_noop(tmp: Path, runs: int) -> list[str]:
    from kiln_project import Project
    root = tmp / "noop"
    root.mkdir()
    p = Project(root)
    p.doit("deploy:local")
    again = p.doit("deploy:local")
    note = "" if not again.ran() else f" (NOT a no-op: ran {', '.join(sorted(again.ran()))})"
    # doit's own floor: a dodo.py with one up-to-date task and nothing of enginekiln. What doit does on
    # every run beyond `import doit` (scanning every installed distribution's entry points for plugins,
    # tokenizing task creators' source, the dep file) is in it; the rest of the no-op is ours.
    floor = root / "floor"
    floor.mkdir()
    (floor / "dodo.py").write_text("def task_nothing():\n    return {'actions': ['true'], 'uptodate': [True]}\n")
    times = interleaved({"import": (IMPORT_DOIT, None), "noop": ([PY, "-m", "doit", "deploy:local"], p.env),
                         "floor": ([PY, "-m", "doit", "-f", str(floor / "dodo.py"), "--dir", str(floor)], None)}, runs)
    med, imp, low = (statistics.median(times[k]) for k in ("noop", "import", "floor"))
    ratios = [a / b for a, b in zip(times["noop"], times["import"])]
    print(f"python -c 'import doit'            {fmt_ms(times['import'])}  (baseline)")
    print(f"doit, one up-to-date task          {fmt_ms(times['floor'])}  (doit's own floor)")
    print(f"no-op doit deploy:local            {fmt_ms(times['noop'])}{note}")
    ratio = med / imp
    return [f"summary: no-op deploy:local: {med * 1000:.0f} ms = {ratio:.2f}x import doit ({imp * 1000:.0f} ms; "
            f"per-round ratio {min(ratios):.2f}-{max(ratios):.2f}x); doit's own floor {low * 1000:.0f} ms = "
            f"{low / imp:.2f}x, enginekiln's part {(med - low) * 1000:.0f} ms{note} [target <= {NOOP_RATIO_TARGET}x] -> "
            f"{verdict(ratio <= NOOP_RATIO_TARGET and not again.ran())}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,12,50", help="device counts for deploy:<one> (default 1,12,50)")
    ap.add_argument("--repeats", type=int, default=3, help="retrain + deploy:<one> per size (default 3)")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 7)),
                    help="runs of `doit list` / the no-op, interleaved with the baseline (default 7)")
    ap.add_argument("--device-profile", default="orin-jp5", help="simulated device profile (orin-jp5, cpu, ...)")
    ap.add_argument("--builder", action="store_true", help="make the last device of each fleet `builder = true`")
    ap.add_argument("--list-targets", type=int, default=200, help="targets in the `doit list` fleet file")
    ap.add_argument("--only", default="noop,list,deploy-one", help="comma-separated: noop,list,deploy-one")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    as_users_run()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    print(f"== scope benchmark: medians [range], ratios vs baselines of the same run, {os.cpu_count()} CPUs ==",
          flush=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-scope-", dir=os.environ.get("KILN_BENCH_TMP")))
    fleets: list = []
    summary: list[str] = []
    failed = False
    try:
        if "noop" in only:
            print(f"-- no-op deploy:local ({args.runs} interleaved rounds)", flush=True)
            summary += bench_noop(tmp, args.runs)
        if "list" in only:
            print(f"-- doit list, {args.list_targets} targets ({args.runs} interleaved rounds)", flush=True)
            summary += bench_list(tmp, args.list_targets, args.runs)
        if "deploy-one" in only and sizes:
            reason = sim_unsupported()
            if reason:
                summary.append(f"summary: deploy:<one> SKIPPED: simulated fleet unavailable: {reason}")
            else:
                print(f"-- deploy:<one> after a retrain, sizes {sizes}, {args.repeats} repeats, "
                      f"profile {args.device_profile}", flush=True)
                results = bench_deploy_one(tmp, sizes, args, fleets)
                summary += ["summary: deploy:<one> fleet start: " + ", ".join(
                    f"{r['n']} sshd in {r['start']:.2f} s" for r in results)]
                summary += report_deploy_one(results, args.builder)
    except Exception as exc:  # a benchmark reports, it does not crash the suite runner
        import traceback
        traceback.print_exc()
        lines = [l for l in str(exc).strip().splitlines() if l.strip()] or [""]
        why = lines[0][:150] + (f" ... {lines[-1].strip()[:200]}" if len(lines) > 1 else "")
        summary.append(f"summary: ERROR: scope benchmark failed: {type(exc).__name__}: {why}")
        failed = True
    finally:
        stop_fleets(fleets, tmp)
    print()
    for line in summary:
        print(line)
    print(f"scope benchmark: {time.perf_counter() - started:.0f} s")
    missed = any(line.endswith("FAIL") or "-> FAIL" in line for line in summary)
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
