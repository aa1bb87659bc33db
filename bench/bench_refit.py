"""Refit vs full build after a retrain, on a simulated Orin class (real sshd per device, tests/fleet/sim.py).

    .venv/bin/python bench/bench_refit.py [--runs N] [--devices 2] [--build-seconds 2] [--profile orin-jp6]

Two projects over the same kind of fleet (--devices identical Orins of --profile, one class), each
deployed once, then --runs rounds of: retrain (new weights, same graph), `doit -n 4 deploy`, timed.
  - refit:  `build.refit = true`: the engine is refitted from its base on a device of the class
            (the TensorRT Python API; simulated refit time = build time x KILN_SIM_REFIT_RATIO);
  - build:  the same model without it: every retrain is a full build (baseline).
Reported: median wall time of a retrain deploy for each, their ratio, and the engine step alone
(its build/refit seconds as the devices report them, from the published manifests), with the
simulator's figures and where they come from. Builds and refits are counted on the devices
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


def run_variant(tmp: Path, tag: str, refit: bool, args, fleets: list) -> dict:
    from tests.fleet.sim import Fleet
    sim = Fleet(tmp / f"fleet-{tag}")
    fleets.append(sim)
    names = [f"{tag}-{i:02d}" for i in range(args.devices)]
    env = {"KILN_SIM_BUILD_SECONDS": args.build_seconds, "KILN_SIM_REFIT_RATIO": args.refit_ratio}
    for n in names:
        sim.add_device(n, args.profile, sim_env=env)
    sim.start()
    p = fleet_project(tmp / f"proj-{tag}", sim, {n: {} for n in names})
    if refit:
        p.fleet.write_text(p.fleet.read_text().replace('outputs = ["logits", "pred_boxes"]\n',
                                                       'outputs = ["logits", "pred_boxes"]\n'
                                                       '[models.tiny.build]\nrefit = true\n', 1))
    p.doit("-n", "4", "deploy")
    samples, builds0, refits0 = [], _state_lines(sim, names, "builds.log"), _state_lines(sim, names, "refits.log")
    for i in range(args.runs):
        retrain(p, 0.01 * (i + 1))
        start = time.perf_counter()
        p.doit("-n", "4", "deploy")
        samples.append(time.perf_counter() - start)
    return {"wall": samples, "engine": _engine_seconds(p)[-args.runs:],
            "builds": _state_lines(sim, names, "builds.log") - builds0,
            "refits": _state_lines(sim, names, "refits.log") - refits0}


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
        base = run_variant(tmp, "build", False, args, fleets)
        ref = run_variant(tmp, "refit", True, args, fleets)
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
        if ref["builds"] or ref["refits"] != args.runs:
            raise AssertionError(f"refit rounds must refit once each and build nothing: {ref}")

    return run_with_fleets("refit", body)


if __name__ == "__main__":
    sys.exit(main())
