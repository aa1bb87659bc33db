"""Shared setup for the benchmarks over simulated devices (bench_fleet.py, bench_scope.py).

Not a benchmark (no bench_ prefix: bench/run.py does not run it). Thin wrappers around
tests/fleet/sim.py (Fleet) and tests/test_fleet.py (fleet_project, retrain), plus the timing
helpers both benchmarks use: medians and ranges, never a single best run.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (str(REPO / "tests"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def median_time(fn, runs: int) -> tuple[float, list]:
    """Median wall time of `runs` calls of fn, and their results."""
    samples, results = [], []
    for _ in range(runs):
        start = time.perf_counter()
        results.append(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), results


def spread(samples: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the samples."""
    return statistics.median(samples), min(samples), max(samples)


def fmt_ms(samples: list[float]) -> str:
    """'median ms [min-max]'."""
    med, lo, hi = spread(samples)
    return f"{med * 1000:.0f} ms [{lo * 1000:.0f}-{hi * 1000:.0f}]"


def fmt_s(samples: list[float]) -> str:
    med, lo, hi = spread(samples)
    return f"{med:.2f} s [{lo:.2f}-{hi:.2f}]"


def as_users_run() -> None:
    """Measure what a user runs: Python caches compiled modules (`__pycache__`). With
    PYTHONDONTWRITEBYTECODE set (as in some sandboxes) enginekiln's modules would be compiled from
    source on every command while doit's, compiled at pip install, would not: a baseline of
    `import doit` would then flatter doit by several ms per command."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def run_timed(argv: list[str], env=None, timeout: float = 300) -> float:
    """Wall time of one command run from the repo (output discarded; a failure raises).

    The wait blocks in waitpid: `subprocess.run(timeout=...)` polls with sleeps of up to 50 ms,
    which rounds every measurement up to the next poll (times came out as 115, 165, 215 ms).
    The timeout is a watchdog that kills a hung command instead."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - start
    if code != 0:
        raise subprocess.CalledProcessError(code, argv)
    return elapsed


def interleaved(commands: dict[str, tuple[list[str], dict | None]], runs: int) -> dict[str, list[float]]:
    """Wall times of each command, `runs` rounds, one run of every command per round: a noisy spell
    of the shared machine hits the baseline and the measured command alike."""
    out: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, (argv, env) in commands.items():
            out[name].append(run_timed(argv, env))
    return out


def sim_unsupported() -> str | None:
    """Why simulated devices cannot run here (None if they can)."""
    from tests.fleet.sim import unsupported_reason
    return unsupported_reason()


def settle_logins(sim, names, expected: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
    """Device-side login counts, once each device reached `expected` (sshd logs lag) and a short
    extra wait found no more."""
    for n in names:
        sim.wait_logins(n, expected[n], timeout=timeout)
    time.sleep(0.3)
    return {n: sim.logins(n) for n in names}


def start_fleet(root: Path, profiles: list[str], fleets: list, prefix: str | None = None):
    """A started Fleet of one device per profile (registered in `fleets` first, so it is always
    stopped). Device names: `<prefix or profile family>-<i>`."""
    from tests.fleet.sim import Fleet
    sim = Fleet(root)
    fleets.append(sim)
    names = []
    for i, prof in enumerate(profiles):
        name = f"{prefix or prof.split('-')[0]}-{i:02d}"
        sim.add_device(name, prof)
        names.append(name)
    try:
        sim.start()
    except RuntimeError as exc:  # a busy shared machine: one retry (start() stopped what it started)
        print(f"note: fleet start failed, retrying once: {str(exc).splitlines()[0]}", file=sys.stderr)
        sim.start()
    return sim, names


def fleet_project(root: Path, sim, devices: dict[str, dict]):
    """A tests/kiln_project.Project whose targets are the simulated devices (tests/test_fleet.py)."""
    from test_fleet import fleet_project as make
    root.mkdir(parents=True, exist_ok=True)
    return make(root, sim, devices)


def retrain(project, delta: float) -> None:
    """New weights in the project's checkpoint (torch in a subprocess, tests/test_fleet.py)."""
    from test_fleet import retrain as change
    change(project, delta)


def active_release(sim, name: str, install_dir: str = "/srv/kiln", model: str = "tiny") -> str | None:
    """The release a simulated device serves (its `current` link), None if none."""
    current = sim.srv(name) / install_dir.removeprefix("/srv/") / model / "current"
    return current.resolve().name if current.is_symlink() else None


def stop_fleets(fleets: list, tmp: Path) -> None:
    """Stop every simulated fleet a benchmark started (warn, don't raise) and remove its folder."""
    import shutil
    for sim in fleets:
        try:
            sim.stop()
        except Exception as exc:  # noqa: BLE001 - teardown reports, it does not mask the result
            print(f"warning: stopping simulated fleet failed: {exc}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)


def run_with_fleets(name: str, body) -> int:
    """Run a fleet benchmark's `body(tmp, fleets)` in a fresh temp folder: a failure is reported
    (exit 1), never raised, so the suite runner goes on; the fleets are stopped and the folder removed."""
    import tempfile
    import traceback
    fleets: list = []
    tmp = Path(tempfile.mkdtemp(prefix=f"kiln-bench-{name}-", dir=os.environ.get("KILN_BENCH_TMP")))
    try:
        body(tmp, fleets)
    except Exception as exc:  # a benchmark reports, it does not crash the suite runner
        traceback.print_exc()
        print(f"ERROR: {name} benchmark failed: {type(exc).__name__}: {str(exc)[:300]}")
        return 1
    finally:
        stop_fleets(fleets, tmp)
    return 0
