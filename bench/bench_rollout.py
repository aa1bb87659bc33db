"""Rollout and lease benchmark over simulated Jetsons (real sshd per device, tests/fleet/sim.py).

    .venv/bin/python bench/bench_rollout.py [--runs N] [--devices 6] [--per-controller 5]
                                            [--build-seconds 2] [--skip canary|lease]

In one run, medians over --runs and ratios against baselines measured in the same run:
  1. canary abort: --devices identical Orins in group `line` with
     `rollout = { canary = 1, waves = ["50%", "100%"], max_fail_percentage = 0 }`, deployed once;
     then the canary is made 4x slower (KILN_SIM_LATENCY_MS=40 in its trtexec) and the model
     retrained: `doit -n 4 deploy:line` must stop at the latency gate (exit 1). Timed, and the
     devices it touched counted on the devices: releases changed (the `current` link) and engine
     loads (trtexec_sim's loads.log). Baseline: the same fleet without a rollout policy, same
     retrain, a plain `doit -n 4 deploy:line` (every device switched).
  2. two-controller lease: 2 controllers (own artifacts folder, one folder store, one signing
     key) x --per-controller Orins of one class each, `doit -n 4 deploy:<their group>` started
     together on a cold store; builds counted on the devices (trtexec_sim's builds.log; must be
     1) and the wall time until both are done. Baseline: one controller alone, same N devices,
     its own cold store. Fresh fleets every round (a cold store each time).
Needs root and /usr/sbin/sshd (the simulator); otherwise prints SKIPPED and exits 0.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _fleet_setup import (active_release, as_users_run, fleet_project, fmt_s, retrain, run_with_fleets, sim_unsupported,  # noqa: E402
                          start_fleet)

POLICY = '\n[groups.line]\nrollout = { canary = 1, waves = ["50%", "100%"], max_fail_percentage = 0 }\n'


# -- 1. canary abort ----------------------------------------------------------------------------

class LineFleet:
    """N devices in group `line`, deployed once; `policy` adds the rollout policy."""

    def __init__(self, tmp: Path, tag: str, n: int, fleets: list, policy: bool):
        self.sim, self.names = start_fleet(tmp / f"fleet-{tag}", ["orin-jp5"] * n, fleets, prefix=f"{tag}")
        self.p = fleet_project(tmp / f"proj-{tag}", self.sim, {d: {"groups": ["line"]} for d in self.names})
        if policy:
            self.p.fleet.write_text(self.p.fleet.read_text() + POLICY)
        self.p.doit("-n", "4", "deploy:line")
        self.delta = 0.0

    def state(self) -> dict:
        return {d: (active_release(self.sim, d), len(self.sim.loads(d))) for d in self.names}

    def round(self) -> dict:
        """Retrain, then one timed `doit -n 4 deploy:line`: wall time, exit code, devices touched."""
        self.delta += 0.01
        retrain(self.p, self.delta)
        before = self.state()
        start = time.perf_counter()
        run = self.p.doit("-n", "4", "deploy:line", check=False)
        wall = time.perf_counter() - start
        after = self.state()
        switched = [d for d in self.names if after[d][0] != before[d][0]]
        loaded = [d for d in self.names if after[d][1] != before[d][1]]
        return {"wall": wall, "rc": run.returncode, "out": run.out, "switched": switched, "loaded": loaded,
                "loads": sum(after[d][1] - before[d][1] for d in self.names)}


def bench_canary(tmp: Path, n: int, runs: int, fleets: list) -> list[str]:
    gated = LineFleet(tmp, "roll", n, fleets, policy=True)
    canary = gated.names[0]
    gated.sim.upgrade(canary, sim_env={"KILN_SIM_LATENCY_MS": "40"})  # its new engines run 4x slower
    plain = LineFleet(tmp, "plain", n, fleets, policy=False)
    aborted, full = [], []
    for _ in range(runs):  # interleaved: a noisy spell hits both
        a = gated.round()
        if a["rc"] != 1 or f"latency gate on {canary}" not in a["out"]:
            raise AssertionError(f"the rollout was expected to stop at the latency gate:\n{a['out'][-3000:]}")
        aborted.append(a)
        b = plain.round()
        if b["rc"] != 0:
            raise AssertionError(f"plain deploy:line failed:\n{b['out'][-3000:]}")
        full.append(b)
    med = sorted(x["wall"] for x in aborted)[len(aborted) // 2] / sorted(x["wall"] for x in full)[len(full) // 2]
    touched = sorted({d for a in aborted for d in a["switched"] + a["loaded"]})
    others_touched = [d for d in touched if d != canary]
    lines = [
        f"canary abort, {n} devices (canary {canary} 4x slower): aborted deploy:line {fmt_s([a['wall'] for a in aborted])}",
        f"  releases changed {max(len(a['switched']) for a in aborted)}/{n}, devices with loads "
        f"{max(len(a['loaded']) for a in aborted)}/{n} (loads {', '.join(str(a['loads']) for a in aborted)}), "
        f"touched beyond the canary: {others_touched or 'none'}",
        f"  baseline plain deploy:line (no policy): {fmt_s([b['wall'] for b in full])}, releases changed "
        f"{min(len(b['switched']) for b in full)}/{n}, devices with loads {min(len(b['loaded']) for b in full)}/{n}",
    ]
    ok = not others_touched and all(not a["switched"] for a in aborted)
    lines.append(f"summary: canary abort ({n} devices): {fmt_s([a['wall'] for a in aborted])} = {med:.2f}x a plain "
                 f"group deploy ({fmt_s([b['wall'] for b in full])}); touched: "
                 f"{max(len(set(a['switched'] + a['loaded'])) for a in aborted)} device(s) (the canary, loads only, "
                 f"never switched) vs {n} -> {'OK' if ok else 'MISSED'}")
    return lines


# -- 2. two controllers, one store ----------------------------------------------------------------

def lease_round(tmp: Path, tag: str, per: int, controllers: int, build_s: str, fleets: list) -> dict:
    from kiln.signing import create_private_key
    from tests.fleet.sim import Fleet
    sim = Fleet(tmp / f"fleet-{tag}")
    fleets.append(sim)
    groups = {f"line-{c}": [f"{tag}-{c}{i}" for i in range(per)] for c in "ab"[:controllers]}
    devices = [d for ds in groups.values() for d in ds]
    for d in devices:
        sim.add_device(d, "orin-jp5", sim_env={"KILN_SIM_BUILD_SECONDS": build_s})
    sim.start()
    shared = tmp / f"shared-{tag}"
    shared.mkdir()
    key = shared / "signing.key"
    create_private_key(key)
    extra = f'\n[store]\nurl = "file://{shared / "store"}"\n\n[signing]\nkey = "{key}"\n'
    projects = {}
    for g in groups:
        p = fleet_project(tmp / f"{tag}-{g}", sim, {d: {"groups": [h for h, ds in groups.items() if d in ds]}
                                                     for d in devices})
        p.fleet.write_text(p.fleet.read_text() + extra)
        projects[g] = p
    start = time.perf_counter()
    procs = {g: subprocess.Popen([sys.executable, "-m", "doit", "-n", "4", f"deploy:{g}"], cwd=REPO, env=p.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for g, p in projects.items()}
    outs = {g: proc.communicate(timeout=600)[0] for g, proc in procs.items()}
    wall = time.perf_counter() - start
    for g, proc in procs.items():
        if proc.returncode != 0:
            raise AssertionError(f"controller {g} exited {proc.returncode}:\n{outs[g][-3000:]}")
    builds = sum(len(sim.builds(d)) for d in devices)
    waited = sum("waiting for run " in o for o in outs.values())
    sim.stop()
    return {"wall": wall, "builds": builds, "waited": waited, "devices": len(devices)}


def bench_lease(tmp: Path, per: int, runs: int, build_s: str, fleets: list) -> list[str]:
    two, one = [], []
    for r in range(runs):
        two.append(lease_round(tmp, f"two{r}", per, 2, build_s, fleets))
        one.append(lease_round(tmp, f"one{r}", per, 1, build_s, fleets))
    med2 = sorted(x["wall"] for x in two)[runs // 2]
    med1 = sorted(x["wall"] for x in one)[runs // 2]
    builds = [x["builds"] for x in two]
    ok = all(b == 1 for b in builds)
    return [
        f"two controllers x {per} Orins of one class, one store, started together (builds take {build_s} s): "
        f"{fmt_s([x['wall'] for x in two])}, builds counted on the devices {builds}, a controller said it waited "
        f"in {sum(x['waited'] for x in two)} of {runs} runs",
        f"  baseline one controller alone, {per} devices: {fmt_s([x['wall'] for x in one])}, builds "
        f"{[x['builds'] for x in one]}",
        f"summary: two-controller lease (2x{per} devices, one class): builds {'/'.join(map(str, builds))} "
        f"(target 1 -> {'OK' if ok else 'MISSED'}); wall {fmt_s([x['wall'] for x in two])} = {med2 / med1:.2f}x "
        f"one controller alone ({fmt_s([x['wall'] for x in one])})",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 3)))
    ap.add_argument("--devices", type=int, default=6, help="devices of the canary group (default 6)")
    ap.add_argument("--per-controller", type=int, default=5, help="devices per controller (default 5)")
    ap.add_argument("--build-seconds", default="2", help="simulated engine build time for the lease (default 2)")
    ap.add_argument("--skip", default="", help="comma-separated: canary, lease")
    args = ap.parse_args(argv)
    as_users_run()
    skip = {s for s in args.skip.split(",") if s}
    print(f"== rollout benchmark: simulated Jetsons over SSH, {args.runs} runs, {os.cpu_count()} CPUs ==")
    reason = sim_unsupported()
    if reason:
        print(f"SKIPPED: simulated fleet unavailable: {reason}")
        return 0

    def body(tmp: Path, fleets: list) -> None:
        if "canary" not in skip:
            print("\n".join(bench_canary(tmp, args.devices, args.runs, fleets)), flush=True)
        if "lease" not in skip:
            print("\n".join(bench_lease(tmp, args.per_controller, args.runs, args.build_seconds, fleets)), flush=True)
    return run_with_fleets("rollout", body)


if __name__ == "__main__":
    sys.exit(main())
