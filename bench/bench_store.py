"""Benchmark S3Store against raw boto3 on a loopback moto S3 server.

    .venv/bin/python bench/bench_store.py [--size-mb 200] [--runs 3] [--models 20] [--classes 4]

Measures, on the same random file and the same server, in one run:
  - S3Store.put_file with the expected sha256 given (one read pass) and without it
    (hash pass first), vs boto3 `upload_file` (TransferConfig defaults);
  - S3Store.get_file (verified: hashed while downloading, renamed when it matches) vs
    boto3 `download_file` (no verification);
  - the HTTP requests of a no-op cache check: `info()` for M models x K classes, counted
    with botocore's `before-send` event.
Prints medians over the runs and the ratios (target >= 0.9x). moto is a Python server,
so absolute numbers are bounded by it; the ratios are what this measures.
Env: KILN_BENCH_SIZE_MB, KILN_BENCH_RUNS override the defaults.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.s3server import MotoS3, patched_env, scrubbed_aws_env  # noqa: E402

MB = 1 << 20


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=int(os.environ.get("KILN_BENCH_SIZE_MB", 200)))
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 3)))
    ap.add_argument("--models", type=int, default=20, help="M models for the no-op cache check")
    ap.add_argument("--classes", type=int, default=4, help="K hardware classes for the cache check")
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    with patched_env(scrubbed_aws_env()), tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        from boto3.s3.transfer import TransferConfig

        from kiln.s3store import S3Store
        from kiln.store import engine_entry

        server = MotoS3().start()
        try:
            bucket = server.new_bucket("bench")
            raw = server.client()
            store = S3Store(bucket, "bench", endpoint_url=server.endpoint)
            store.check()
            size = args.size_mb * MB
            src = Path(tmp) / "payload.bin"
            t0 = time.perf_counter()
            sha = make_file(src, size)
            print(f"file: {args.size_mb} MiB random, runs: {args.runs}, server: moto on {server.endpoint}")
            hash_s = timed(lambda: hashlib.file_digest(open(src, "rb"), "sha256"))
            print(f"(made the file in {time.perf_counter() - t0:.1f}s; sha256 alone: "
                  f"{args.size_mb / hash_s:.0f} MiB/s)")

            results: dict[str, list[float]] = {k: [] for k in (
                "store put (sha given)", "store put (sha computed)", "boto3 upload_file",
                "store get (verified)", "boto3 download_file")}
            cfg = TransferConfig()
            for run in range(args.runs):
                names = {k: f"run{run}/{i}" for i, k in enumerate(results)}
                results["boto3 upload_file"].append(timed(lambda: raw.upload_file(
                    str(src), bucket, f"bench/raw{run}", Config=cfg)))
                results["store put (sha given)"].append(timed(
                    lambda: store.put_file(names["store put (sha given)"], src, sha256=sha)))
                results["store put (sha computed)"].append(timed(
                    lambda: store.put_file(names["store put (sha computed)"], src)))
                results["boto3 download_file"].append(timed(lambda: raw.download_file(
                    bucket, f"bench/raw{run}", str(Path(tmp) / "raw.out"), Config=cfg)))
                results["store get (verified)"].append(timed(lambda: store.get_file(
                    names["store put (sha given)"], Path(tmp) / "store.out", sha256=sha)))
                for p in (Path(tmp) / "raw.out", Path(tmp) / "store.out"):
                    p.unlink()
                for name in store.list(f"run{run}/"):  # keep moto's memory flat
                    store.delete(name)
                raw.delete_object(Bucket=bucket, Key=f"bench/raw{run}")

            med = {k: statistics.median(v) for k, v in results.items()}
            print(f"\n{'operation':28} {'median s':>9} {'MiB/s':>8}   runs (s)")
            for k, v in results.items():
                print(f"{k:28} {med[k]:9.2f} {args.size_mb / med[k]:8.0f}   "
                      + " ".join(f"{x:.2f}" for x in v))
            print("\nthroughput ratio vs raw boto3 (target >= 0.90x):")
            for ours, theirs in (("store put (sha given)", "boto3 upload_file"),
                                 ("store put (sha computed)", "boto3 upload_file"),
                                 ("store get (verified)", "boto3 download_file")):
                print(f"  {ours:26} / {theirs:20} = {med[theirs] / med[ours]:.2f}x")

            # -- no-op cache check: M models x K classes, all present ------------------
            keys = [hashlib.sha256(f"{m}/{c}".encode()).hexdigest()
                    for m in range(args.models) for c in range(args.classes)]
            for key in keys:
                store.put_bytes(engine_entry(key), key.encode())
            checker = S3Store(bucket, "bench", endpoint_url=server.endpoint)
            sent: list[str] = []
            checker.client.meta.events.register(
                "before-send.s3", lambda request, **_: sent.append(request.method))
            start = time.perf_counter()
            hits = sum(checker.info(engine_entry(k)) is not None for k in keys)
            elapsed = time.perf_counter() - start
            methods = {m: sent.count(m) for m in sorted(set(sent))}
            print(f"\nno-op cache check: {args.models} models x {args.classes} classes = {len(keys)} "
                  f"info() calls, {hits} hits, {len(sent)} HTTP requests {methods}, "
                  f"{elapsed * 1000:.0f} ms ({elapsed / len(keys) * 1000:.1f} ms/entry), "
                  "0 payload bytes")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
