"""Refit vs full build after a retrain, on a simulated Orin class (real sshd per device, tests/fleet/sim.py).

    .venv/bin/python bench/bench_refit.py [--runs N] [--devices 2] [--build-seconds 2] [--profile orin-jp6]

Two projects over the same kind of fleet (--devices identical Orins of --profile, one class), each
deployed once, then --runs rounds of: retrain (new weights, same graph), `doit -n 4 deploy`, timed.
  - refit:  `build.refit = true`: the engine is refitted from its base on a device of the class
            (the TensorRT Python API; simulated refit time = build time x KILN_SIM_REFIT_RATIO);
  - build:  the same model without it: every retrain is a full build (baseline).
Reported: median wall time of a retrain deploy for each, their ratio, the engine stage on the
builder (send inputs, build or refit, verify: the publish event's seconds) and the build/refit step
alone (its seconds as the devices report them, from the published manifests), with the
simulator's figures and where they come from. The full builds of the baseline load the class's
timing cache (the simulator halves their time then, as a warm cache shortens a real build); the
simulated refit is the cold build time x the ratio. Builds and refits are counted on the devices
(trtexec_sim's builds.log, the simulated tensorrt package's refits.log): each refit round must
add one refit and no build. Needs root and /usr/sbin/sshd; otherwise prints SKIPPED and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _fleet_setup import as_users_run, fleet_project, fmt_s, retrain, run_with_fleets, sim_unsupported  # noqa: E402

SOURCE = ('Torch-TensorRT: refit is "typically 80-95% faster than a full rebuild" '
          '(docs.pytorch.org/TensorRT/contributors/weight_refit.html); docs/trtexec.md §13')


def _state_lines(sim, names, file: str) -> int:
    return sum(len(sim._state_log(n, file)) for n in names)


def _engine_seconds(p) -> list[float]:
    """build_seconds of the published manifests, newest last (what the device reported)."""
    out = []
    for m in sorted((p.artifacts / "store" / "entries" / "engines").glob("*/*/manifest.json"),
                    key=lambda f: json.loads(f.read_text()).get("built_at", "")):
        out.append(json.loads(m.read_text()).get("build_seconds") or 0.0)
    return out


class Variant:
    """--devices Orins of one class and a project deployed once; `refit` turns build.refit on."""

    def __init__(self, tmp: Path, tag: str, refit: bool, args, fleets: list):
        from tests.fleet.sim import JETSON_PYTHON, Fleet  # JETSON_PYTHON: numpy + the simulated bindings
        self.sim = Fleet(tmp / f"fleet-{tag}")
        fleets.append(self.sim)
        self.names = [f"{tag}-{i:02d}" for i in range(args.devices)]
        env = {"KILN_SIM_BUILD_SECONDS": args.build_seconds, "KILN_SIM_REFIT_RATIO": args.refit_ratio}
        for n in self.names:
            self.sim.add_device(n, args.profile, sim_env=env)
        self.sim.start()
        self.p = fleet_project(tmp / f"proj-{tag}", self.sim, {n: {"python": JETSON_PYTHON} for n in self.names})
        if refit:
            self.p.fleet.write_text(self.p.fleet.read_text().replace(
                'outputs = ["logits", "pred_boxes"]\n', 'outputs = ["logits", "pred_boxes"]\n[models.tiny.build]\nrefit = true\n', 1))
        self.p.doit("-n", "4", "deploy")
        self.wall: list[float] = []
        self.start = (self.count("builds.log"), self.count("refits.log"))

    def count(self, file: str) -> int:
        return sum(len(self.sim._state_log(n, file)) for n in self.names)

    def round(self, i: int) -> None:
        """Retrain (new weights, same graph), then one timed `doit -n 4 deploy`."""
        retrain(self.p, 0.01 * (i + 1))
        start = time.perf_counter()
        self.p.doit("-n", "4", "deploy")
        self.wall.append(time.perf_counter() - start)

    def result(self, runs: int) -> dict:
        stage = [e["seconds"] for e in self.p.events() if e["event"] == "publish" and e["task"].startswith("engine:")]
        return {"wall": self.wall, "engine": _engine_seconds(self.p)[-runs:], "stage": stage[-runs:],
                "builds": self.count("builds.log") - self.start[0], "refits": self.count("refits.log") - self.start[1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 3)))
    ap.add_argument("--devices", type=int, default=2, help="identical Orins in the class (default 2)")
    ap.add_argument("--build-seconds", default="2", help="simulated full build time, s (default 2)")
    ap.add_argument("--refit-ratio", default="0.2", help="simulated refit/build time (default 0.2, see SOURCE)")
    ap.add_argument("--profile", default="orin-jp6", help="simulated device profile (default orin-jp6: TensorRT 10.3)")
    args = ap.parse_args(argv)
    as_users_run()
    reason = sim_unsupported()
    if reason:
        print(f"SKIPPED: simulated fleet unavailable: {reason}")
        return 0

    def body(tmp: Path, fleets: list) -> None:
        print(f"simulator: full build {args.build_seconds} s, refit = build x {args.refit_ratio} "
              f"({float(args.build_seconds) * float(args.refit_ratio):.2f} s); source: {SOURCE}")
        variants = [Variant(tmp, "build", False, args, fleets), Variant(tmp, "refit", True, args, fleets)]
        for i in range(args.runs):  # interleaved: a noisy spell of the shared machine hits both alike
            for v in variants:
                v.round(i)
        base, ref = (v.result(args.runs) for v in variants)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"retrain deploy, full build: {fmt_s(base['wall'])} (baseline); builds: {base['builds']}, "
              f"refits: {base['refits']} on the devices")
        print(f"retrain deploy, refit:      {fmt_s(ref['wall'])}; builds: {ref['builds']}, refits: {ref['refits']} "
              f"on the devices")
        print(f"ratio refit/full build, whole deploy: {med(ref['wall']) / med(base['wall']):.2f}x")
        if base["engine"] and ref["engine"] and med(base["engine"]):
            print(f"ratio refit/full build, engine step as the devices report it: "
                  f"{med(ref['engine']):.2f} s / {med(base['engine']):.2f} s = "
                  f"{med(ref['engine']) / med(base['engine']):.2f}x")
        print(f"engine stage on the builder (inputs sent, built or refitted, verified): full build "
              f"{fmt_s(base['stage'])}, refit {fmt_s(ref['stage'])}: ratio {med(ref['stage']) / med(base['stage']):.2f}x")
        if ref["builds"] or ref["refits"] != args.runs:
            raise AssertionError(f"refit rounds must refit once each and build nothing: {ref}")

    return run_with_fleets("refit", body)


if __name__ == "__main__":
    sys.exit(main())
