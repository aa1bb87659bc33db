"""`make bench`: run every benchmark in bench/, one after the other, then print a one-screen summary.

    .venv/bin/python bench/run.py [--runs N] [--size-mb 200] [--models 20] [--classes 4]
                                  [--only store,fleet] [--skip fleet] [--pass fleet='--sizes 1,5']

Every `bench/bench_*.py` found is run as its own subprocess (a crash or a leaked server in one
cannot spoil the next), in a fixed order: ORDER first, then any other bench_*.py by name, so a
new benchmark is picked up by just adding the file. The common flags are handed to each benchmark
that declares them in its `--help` (`--runs` to all that have it, `--size-mb`/`--models`/
`--classes` to bench_store.py, ...); `--pass NAME=ARGS` hands arbitrary arguments to one of them.
Output streams live; the summary at the end repeats each benchmark's result lines (targets,
ratios, request counts; a benchmark that prints `summary: ...` lines, e.g. bench_scope.py, gets
exactly those, unabridged), its exit code and wall time. Exit code: non-zero if any benchmark failed.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ORDER = ["pipeline", "store", "fleet", "scope"]  # the rest follow by name
COMMON = {  # run.py flag -> the same flag of a benchmark, passed only where the benchmark has it
    "runs": "--runs",
    "size_mb": "--size-mb",
    "models": "--models",
    "classes": "--classes",
    "hash_mb": "--hash-mb",
}
# lines worth repeating in the summary: verdicts against targets, ratios, counts, failures
KEY_LINE = re.compile(r"\[target|target[: ]|MISSED|\bOK\b|\d\.\d+x\b|\bratio\b|requests|builds:|bytes hashed|\(baseline\)|"
                      r"SKIPPED|ERROR|Traceback", re.I)
SUMMARY_LINES = 10  # per benchmark, to stay on one screen
# a benchmark that prints `summary: ...` lines gets exactly those (and any errors) in the summary
SUMMARY_LINE = re.compile(r"^(summary:|INFEASIBLE)")


def discover() -> list[tuple[str, Path]]:
    found = {p.stem.removeprefix("bench_"): p for p in BENCH.glob("bench_*.py")}
    ordered = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return [(n, found[n]) for n in ordered]


def accepted_flags(script: Path) -> str:
    """The benchmark's --help text (empty if it has none): which common flags it takes."""
    try:
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def argv_for(name: str, script: Path, args: argparse.Namespace, extra: dict[str, list[str]]) -> list[str]:
    help_text = accepted_flags(script)
    argv = []
    for attr, flag in COMMON.items():
        value = getattr(args, attr)
        if value is not None and re.search(rf"(^|\s){re.escape(flag)}\b", help_text):
            argv += [flag, str(value)]
    return argv + extra.get(name, [])


def run_one(name: str, script: Path, argv: list[str]) -> dict:
    print(f"\n{'=' * 24} bench_{name}.py {' '.join(argv)} {'=' * 24}", flush=True)
    start = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen([sys.executable, "-u", str(script), *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                                 "PYTHONUNBUFFERED": "1"})  # see _fleet_setup.as_users_run
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    wrap = any(l.startswith("summary:") for l in lines)  # summary lines are shown whole (verdict at the end)
    if wrap:
        key = [l.strip().removeprefix("summary:").strip() for l in lines if SUMMARY_LINE.search(l)]
    else:
        key = [l.strip() for l in lines if KEY_LINE.search(l)]
    return {"name": name, "argv": argv, "rc": rc, "seconds": time.perf_counter() - start,
            "key": key, "tail": lines[-3:], "wrap": wrap}


def summary(results: list[dict], total: float) -> str:
    out = ["", "=" * 30 + " benchmark summary " + "=" * 30]
    for r in results:
        verdict = "ok" if r["rc"] == 0 else f"FAILED (exit {r['rc']})"
        out.append(f"bench_{r['name']}.py  {verdict}  {r['seconds']:.0f} s")
        shown = r["key"] or r["tail"]
        for line in shown[:SUMMARY_LINES]:
            out.append(f"  {line[:110] if not r['wrap'] else line}")
        if len(shown) > SUMMARY_LINES:
            out.append(f"  ... {len(shown) - SUMMARY_LINES} more result lines above")
    failed = [r["name"] for r in results if r["rc"] != 0]
    out.append(f"{len(results)} benchmarks in {total:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    out.append("machines are shared and noisy: compare the ratios, not the absolute numbers")
    return "\n".join(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, help="runs per measurement (each benchmark's default if unset)")
    ap.add_argument("--size-mb", type=int, default=200, help="store artifact size in MiB (default 200)")
    ap.add_argument("--models", type=int, help="M models for the cache-check request count")
    ap.add_argument("--classes", type=int, help="K hardware classes for the cache-check request count")
    ap.add_argument("--hash-mb", type=int, help="file size for the hashing benchmark")
    ap.add_argument("--only", help="comma-separated benchmarks to run (e.g. store,fleet)")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--pass", dest="passthrough", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments for one benchmark, e.g. --pass fleet='--sizes 1,5 --profile'")
    ap.add_argument("--list", action="store_true", help="list the benchmarks in run order and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    benches = discover()
    names = [n for n, _ in benches]
    if args.list:
        print("\n".join(f"bench_{n}.py" for n in names))
        return 0
    extra: dict[str, list[str]] = {}
    for item in args.passthrough:
        name, sep, rest = item.partition("=")
        if not sep or name not in names:
            print(f"run.py: --pass wants NAME=ARGS with NAME one of {', '.join(names)}; got {item!r}",
                  file=sys.stderr)
            return 2
        extra.setdefault(name, []).extend(shlex.split(rest))
    wanted = [s for s in (args.only or "").split(",") if s]
    skipped = {s for s in args.skip.split(",") if s}
    unknown = (set(wanted) | skipped) - set(names)
    if unknown:
        print(f"run.py: unknown benchmark(s) {', '.join(sorted(unknown))}; have {', '.join(names)}",
              file=sys.stderr)
        return 2
    selected = [(n, p) for n, p in benches if (not wanted or n in wanted) and n not in skipped]
    start = time.perf_counter()
    results = []
    for name, script in selected:
        results.append(run_one(name, script, argv_for(name, script, args, extra)))
    print(summary(results, time.perf_counter() - start))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
