"""Benchmark S3Store against raw boto3 on a loopback moto S3 server.

    .venv/bin/python bench/bench_store.py [--size-mb 200] [--runs 3] [--models 20] [--classes 4]

Measures, on the same random file and the same server, in one run:
  - S3Store.put_file with the expected sha256 given (one read pass) and without it
    (hash pass first), vs boto3 `upload_file` (TransferConfig defaults);
  - S3Store.get_file (verified: hashed while downloading, renamed when it matches) vs
    boto3 `download_file` (no verification);
  - the S3 requests of `doit cache-check` for M models x K classes: the real cache-check logic
    (kiln.report.cache_report with a Context) on a generated fleet of M models x K local
    targets whose recorded fingerprints are K distinct hardware classes, counted with botocore
    event hooks (`before-call` per API call, `before-send` per HTTP attempt). Three cases: all
    engines missing, the no-op (all present) on a build server that has the records in
    artifacts/, and the no-op on a CI worker with an empty artifacts folder (fingerprints and
    ONNX records come from the store).
Prints medians over the runs and the ratios (target >= 0.9x): of the medians, and the median and range of
the per-run ratios (each run does the three puts back to back, then the two gets). moto is a Python
server, so absolute numbers are bounded by it; the ratios are what this measures.
--size-mb 0 skips the throughput part. Env: KILN_BENCH_SIZE_MB, KILN_BENCH_RUNS override the defaults.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.s3server import MotoS3, free_port, patched_env, scrubbed_aws_env  # noqa: E402

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


def process_cpu() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class MotoProcess(MotoS3):
    """The same moto S3 server, in its own process (`python -m moto.server`): the CPU this process
    spends is then the client's alone, a figure the shared machine's load does not blur."""

    def __init__(self) -> None:
        import subprocess
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> "MotoProcess":
        import urllib.request
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto.server did not start")
                time.sleep(0.2)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)


def throughput(args, server, bucket: str, raw, store, tmp: Path) -> None:
    """S3Store put/get vs raw boto3 transfers of one random file, medians over the runs."""
    from boto3.s3.transfer import TransferConfig
    size = args.size_mb * MB
    src = tmp / "payload.bin"
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
    # Every put starts from the same server state: moto keeps objects in its own (this) process's
    # memory and its CompleteMultipartUpload (joining the parts) slows down as that grows, so a put
    # measured after other objects were stored in the round looked slower than one measured
    # first (the raw upload always went first: 0.8x that was the order, not the store). Each put's
    # object is deleted right after it (untimed), the two objects the gets read are uploaded
    # once beforehand, and the order of the operations rotates from run to run.
    raw.upload_file(str(src), bucket, "bench/raw-get", Config=cfg)
    store.put_file("get/src", src, sha256=sha)
    ops = {
        "boto3 upload_file": (lambda r: raw.upload_file(str(src), bucket, f"bench/raw{r}", Config=cfg),
                              lambda r: raw.delete_object(Bucket=bucket, Key=f"bench/raw{r}")),
        "store put (sha given)": (lambda r: store.put_file(f"run{r}/given", src, sha256=sha),
                                  lambda r: store.delete(f"run{r}/given")),
        "store put (sha computed)": (lambda r: store.put_file(f"run{r}/computed", src),
                                     lambda r: store.delete(f"run{r}/computed")),
        "boto3 download_file": (lambda r: raw.download_file(bucket, "bench/raw-get", str(tmp / "raw.out"), Config=cfg),
                                lambda r: (tmp / "raw.out").unlink()),
        "store get (verified)": (lambda r: store.get_file("get/src", tmp / "store.out", sha256=sha),
                                 lambda r: (tmp / "store.out").unlink()),
    }
    # where a put's time goes: first UploadPart call to the last answer, then CompleteMultipartUpload
    # (moto joins the parts in this process), from botocore's call events on both clients
    calls: list = []
    for client in (raw, store.client, store.parts_client):
        client.meta.events.register("before-call.s3", lambda model, **_: calls.append((model.name, "B", time.perf_counter())))
        client.meta.events.register("after-call.s3", lambda model, **_: calls.append((model.name, "A", time.perf_counter())))
    phases: dict[str, list[tuple[float, float]]] = {k: [] for k in results if "put" in k or "upload" in k}
    cpus: dict[str, list[float]] = {k: [] for k in results}
    # the three puts run back to back, then the two gets, each group in an order that rotates from
    # run to run: a busy spell of the shared machine then hits a put and the upload it is compared
    # with alike, and the per-run ratios (below) pair them
    puts = [k for k in ops if "put" in k or "upload" in k]
    gets = [k for k in ops if k not in puts]
    for run in range(args.runs):
        for k in puts[run % 3:] + puts[:run % 3] + gets[run % 2:] + gets[:run % 2]:
            measure, cleanup = ops[k]
            calls.clear()
            cpu0 = process_cpu()
            results[k].append(timed(lambda: measure(run)))
            cpus[k].append(process_cpu() - cpu0)
            if k in phases:
                parts = [t for n, _, t in calls if n == "UploadPart"]
                done = [t for n, _, t in calls if n == "CompleteMultipartUpload"]
                phases[k].append((max(parts) - min(parts), max(done) - min(done)))
            cleanup(run)
    store.delete("get/src")
    raw.delete_object(Bucket=bucket, Key="bench/raw-get")

    med = {k: statistics.median(v) for k, v in results.items()}
    whose = "the client's alone (moto in its own process)" if args.moto_process else \
        "this process's: the client and the moto server in it"
    print(f"\n{'operation':28} {'median s':>9} {'MiB/s':>8} {'CPU s':>6}   runs (s); CPU = {whose}")
    for k, v in results.items():
        print(f"{k:28} {med[k]:9.2f} {args.size_mb / med[k]:8.0f} {statistics.median(cpus[k]):6.2f}   "
              + " ".join(f"{x:.2f}" for x in v))
    print("\nthroughput ratio vs raw boto3 (target >= 0.90x):")
    for ours, theirs in (("store put (sha given)", "boto3 upload_file"),
                         ("store put (sha computed)", "boto3 upload_file"),
                         ("store get (verified)", "boto3 download_file")):
        paired = [t / o for t, o in zip(results[theirs], results[ours])]
        print(f"  {ours:26} / {theirs:20} = {med[theirs] / med[ours]:.2f}x (medians); per run "
              f"{statistics.median(paired):.2f}x [{min(paired):.2f}-{max(paired):.2f}]")
    print("where the puts go (medians): parts = first UploadPart sent to last answered, complete = "
          "CompleteMultipartUpload (the server joins the parts)")
    for k, v in phases.items():
        print(f"  {k:26} parts {statistics.median(x[0] for x in v):.2f} s, complete "
              f"{statistics.median(x[1] for x in v):.2f} s, rest {med[k] - statistics.median(sum(x) for x in v):.2f} s")


def cache_check_requests(args, server, bucket: str, tmp: Path) -> None:
    """Requests of the real cache-check logic on M models x K targets of K distinct classes."""
    from kiln.pipeline.context import Context
    from kiln.devices.local_probe import probe_local
    from kiln.pipeline.reports import cache_ok, cache_report
    from kiln.pipeline.engines import publish_manifest
    from kiln.stores import open_store
    from kiln.stores.base import blob_entry, fingerprint_entry, onnx_record_entry

    m_models, k_classes = args.models, args.classes
    url = f"s3://{bucket}/cache-check"
    fleet = tmp / "fleet" / "targets.toml"
    fleet.parent.mkdir(parents=True, exist_ok=True)
    models = [f"m{i:03d}" for i in range(m_models)]
    from kiln.signing import create_private_key, sign_manifest
    signing_key, _ = create_private_key(tmp / "keys" / "signing.key")  # only signed manifests are hits
    text = f'[store]\nurl = "{url}"\n\n[signing]\nkey = "{tmp / "keys" / "signing.key"}"\n'
    for m in models:
        text += (f'\n[models.{m}]\nfactory = "examples.tiny_detector:build_model"\n'
                 f'checkpoint = "ckpt/{m}.pt"\ninputs = {{ pixel_values = [1, 3, 32, 32] }}\n'
                 'outputs = ["logits", "pred_boxes"]\n')
    for k in range(k_classes):
        text += (f'\n[targets.t{k:03d}]\ntransport = "local"\nbackend = "onnxruntime"\n'
                 f'models = {json.dumps(models)}\ninstall_dir = "deploy/t{k:03d}"\n')
    fleet.write_text(text)

    # what export and fingerprint would have recorded: in the store, and in a build server's artifacts/
    base = probe_local()
    fingerprints = {f"t{k:03d}": {**base, "onnxruntime": f"1.{k}.0-bench"} for k in range(k_classes)}
    records = {m: {"model": m, "onnx_sha256": hashlib.sha256(m.encode()).hexdigest(),
                   "reference_sha256": hashlib.sha256(f"{m}.ref".encode()).hexdigest()} for m in models}
    seed = open_store(url)
    build_server = tmp / "artifacts-build-server"
    for target, fp in fingerprints.items():
        data = json.dumps(fp, sort_keys=True, indent=2).encode()
        seed.put_bytes(fingerprint_entry(target), data, overwrite=True)
        (build_server / "fingerprints").mkdir(parents=True, exist_ok=True)
        (build_server / "fingerprints" / f"{target}.json").write_bytes(data)
    for m, rec in records.items():
        data = json.dumps(rec, sort_keys=True, indent=2).encode()
        seed.put_bytes(onnx_record_entry(m), data, overwrite=True)
        (build_server / "onnx").mkdir(parents=True, exist_ok=True)
        (build_server / "onnx" / f"{m}.json").write_bytes(data)

    def measured(artifacts: Path) -> tuple[list, dict, int, float]:
        ctx = Context.load(fleet, artifacts)
        store = open_store(url)
        calls: Counter = Counter()
        sent: list[str] = []
        events = store.client.meta.events
        events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
        events.register("before-send.s3", lambda request, **_: sent.append(request.method))
        start = time.perf_counter()
        store.check()                    # what Context.store does when first used
        ctx.store = store                # the one the report uses
        rows = cache_report(ctx)
        return rows, dict(calls), len(sent), time.perf_counter() - start

    print(f"\ncache-check requests: {m_models} models x {k_classes} targets = {m_models * k_classes} "
          f"(model, class) pairs, {k_classes} distinct classes (real kiln.report.cache_report):")
    rows, calls, sent, secs = measured(build_server)
    classes = {r.hardware_class for r in rows}
    assert len(rows) == m_models * k_classes and len(classes) == k_classes, (len(rows), len(classes))
    _print_requests("all missing (build server)", rows, calls, sent, secs)
    for r in rows:                       # publish every engine (blob, then its manifest): the next check is the no-op
        sha = hashlib.sha256(r.key.encode()).hexdigest()
        seed.put_bytes(blob_entry(sha), r.key.encode())
        publish_manifest(seed, r.key, sign_manifest({"key": r.key, "sha256": sha, "blob": blob_entry(sha)},
                                                    signing_key))
    rows, calls, sent, secs = measured(build_server)
    assert cache_ok(rows)
    _print_requests("no-op, records in artifacts/", rows, calls, sent, secs)
    rows, calls, sent, secs = measured(tmp / "artifacts-ci-worker")
    assert cache_ok(rows)
    _print_requests("no-op, empty CI checkout", rows, calls, sent, secs)
    print(f"  expected: 1 list + {m_models * k_classes} manifest GET + {m_models * k_classes} blob HEAD once published (one each per pair); an empty checkout adds "
          f"a HEAD+GET per recorded fingerprint ({k_classes}) and per ONNX record ({m_models}); "
          "0 engine bytes read")


def _print_requests(label: str, rows, calls: dict, sent: int, secs: float) -> None:
    hits = sum(r.status == "hit" for r in rows)
    ops = ", ".join(f"{n} {op}" for op, n in sorted(calls.items()))
    print(f"  {label:30} {hits:4d}/{len(rows)} hit  {sum(calls.values()):5d} calls / {sent:5d} HTTP "
          f"requests ({ops})  {secs * 1000:6.0f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=int(os.environ.get("KILN_BENCH_SIZE_MB", 200)))
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 3)))
    ap.add_argument("--models", type=int, default=20, help="M models for the cache check")
    ap.add_argument("--classes", type=int, default=4,
                    help="K targets of K distinct hardware classes for the cache check")
    ap.add_argument("--moto-process", action="store_true",
                    help="run the moto server in its own process (CPU column = the client's alone)")
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    with patched_env(scrubbed_aws_env()), tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        from kiln.stores.s3 import S3Store

        server = (MotoProcess() if args.moto_process else MotoS3()).start()
        try:
            bucket = server.new_bucket("bench")
            raw = server.client()
            store = S3Store(bucket, "bench", endpoint_url=server.endpoint)
            store.check()
            if args.size_mb > 0:
                throughput(args, server, bucket, raw, store, Path(tmp))
            with patched_env({"KILN_S3_ENDPOINT_URL": server.endpoint}):  # as a user would configure it
                cache_check_requests(args, server, bucket, Path(tmp))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
