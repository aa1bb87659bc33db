"""Pipeline benchmarks (issue: end-to-end pipeline). Medians over runs, ratios against
baselines measured in the same run, on the demo fleet (`targets.toml`).

  no-op `doit deploy:local`  vs  `python -c "import doit"`   (target: no-op <= 1.0 s)
  `doit list`                vs  the same baseline
  checkpoint hashing         vs  `sha256sum` on a 1 GB file  (target: >= 0.8x)
  bytes hashed by a no-op run (must be 0)

Usage: python bench/bench_pipeline.py [--runs N] [--hash-mb N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(argv: list[str], runs: int, env=None) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


from _fleet_setup import as_users_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--hash-mb", type=int, default=1024)
    args = ap.parse_args()
    as_users_run()
    py = sys.executable
    print("== pipeline benchmarks (medians of %d runs) ==" % args.runs)

    # make sure the demo is deployed so the next run is a no-op
    subprocess.run([py, "-m", "doit", "deploy:local"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    baseline = timed([py, "-c", "import doit"], args.runs)
    noop = timed([py, "-m", "doit", "deploy:local"], args.runs)
    listing = timed([py, "-m", "doit", "list"], args.runs)
    print(f"python -c 'import doit'     {baseline * 1000:8.0f} ms  (baseline)")
    print(f"no-op doit deploy:local     {noop * 1000:8.0f} ms  {noop / baseline:5.2f}x baseline  "
          f"[target <= 1000 ms: {'OK' if noop <= 1.0 else 'MISSED'}]")
    print(f"doit list                   {listing * 1000:8.0f} ms  {listing / baseline:5.2f}x baseline")

    code = ("import sys; from doit.doit_cmd import DoitMain; from doit.cmd_base import DodoTaskLoader;"
            "rc = DoitMain(DodoTaskLoader()).run(['deploy:local']); import dodo;"
            "print('BYTES', dodo.project.ctx.hashes.bytes_read, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([py, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    hashed = int(proc.stderr.split("BYTES")[1].split()[0])
    print(f"bytes hashed by a no-op run {hashed:8d}     [must be 0: {'OK' if hashed == 0 else 'MISSED'}]")

    from kiln.keys import sha256_file
    with tempfile.TemporaryDirectory(dir=os.environ.get("KILN_BENCH_TMP", None)) as tmp:
        big = Path(tmp) / "big.bin"
        with open(big, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.hash_mb):
                f.write(block)
        runs = max(3, args.runs // 2)
        ours = statistics.median(_time(lambda: sha256_file(big)) for _ in range(runs))
        tool = statistics.median(_time(lambda: subprocess.run(["sha256sum", str(big)], check=True,
                                                              stdout=subprocess.DEVNULL)) for _ in range(runs))
        mb = args.hash_mb
        print(f"sha256sum {mb} MB            {mb / tool:8.0f} MB/s (baseline)")
        print(f"kiln sha256_file {mb} MB     {mb / ours:8.0f} MB/s  {tool / ours:5.2f}x sha256sum  "
              f"[target >= 0.8x: {'OK' if tool / ours >= 0.8 else 'MISSED'}]")
    return 0


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
