"""The pipeline with S3 as hand-off and shared engine cache, for real: `doit` in a subprocess,
torch export, ONNX Runtime, local deploy, and boto3 talking HTTP to moto's S3 server on loopback.

The code under test is configured only the way a user would: `[store] url = "s3://..."` in the
fleet file, and KILN_S3_ENDPOINT_URL / AWS_* in the environment (fake credentials, no AWS config
files: see tests.s3server.scrubbed_aws_env). Behind-the-back changes to the bucket go through a
raw boto3 client, like the store contract suite does.
"""
from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import logging

import pytest

from kiln_project import Project, python
from tests.s3server import FAKE_SECRET, scrubbed_aws_env


def _moto_available() -> str | None:
    try:
        import moto.server  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"{type(exc).__name__}: {exc}"
    return None


logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log would drown failures
pytestmark = pytest.mark.skipif(_moto_available() is not None,
                                reason=f"moto's S3 server cannot start here: {_moto_available()}")


class S3Project(Project):
    """A checkout whose fleet file points at `s3://bucket/prefix` on the moto server."""

    def __init__(self, root: Path, server, bucket: str, prefix: str, *, env: dict | None = None,
                 **kwargs) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.server, self.bucket, self.prefix = server, bucket, prefix
        self.extra_env = env or {}
        # the checkouts of a test are one controller: one signing key (kiln.signing; two controllers
        # that do not trust each other are tests/test_signing.py)
        key = root.parent / f"controller-{bucket}-{prefix}.key"
        super().__init__(root, extra=f'\n[store]\nurl = "s3://{bucket}/{prefix}"\n'
                                     f'\n[signing]\nkey = "{key}"\n', **kwargs)

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        for k, v in scrubbed_aws_env().items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        env["KILN_S3_ENDPOINT_URL"] = self.server.endpoint
        env["AWS_MAX_ATTEMPTS"] = "2"
        env.update(self.extra_env)
        return env

    # -- the bucket, seen from outside ------------------------------------------------
    def keys(self, under: str = "") -> list[str]:
        raw = self.server.client()
        base = f"{self.prefix}/"
        pages = raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + under)
        return sorted(o["Key"][len(base):] for page in pages for o in page.get("Contents", []))

    def stored_engines(self) -> list[str]:
        """Keys served by the store: a manifest whose blob (named by its sha256) exists."""
        blobs = set(self.keys("blobs/"))
        raw = self.server.client()
        found = []
        for k in self.keys("engines/"):
            if k.endswith("/manifest.json"):
                sha = json.loads(raw.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{k}")["Body"].read())["sha256"]
                if f"blobs/{sha[:2]}/{sha}" in blobs:
                    found.append(k.split("/")[2])
        return sorted(found)

    def engine_blob_key(self, key: str) -> str:
        raw = self.server.client()
        manifest = json.loads(raw.get_object(Bucket=self.bucket,
                                             Key=f"{self.prefix}/engines/{key[:2]}/{key}/manifest.json")["Body"].read())
        return f"{self.prefix}/blobs/{manifest['sha256'][:2]}/{manifest['sha256']}"

    def engine_record(self, model: str = "tiny") -> dict:
        return json.loads(next((self.artifacts / "engines").glob(f"{model}@*.json")).read_text())

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events()]


def report_of(run) -> dict:
    return json.loads(run.out[run.out.index("{"):run.out.rindex("}") + 1])


def flip_byte(server, bucket: str, key: str) -> None:
    """Overwrite an object's body with one byte flipped, keeping its metadata (the recorded sha256)."""
    raw = server.client()
    obj = raw.get_object(Bucket=bucket, Key=key)
    data = bytearray(obj["Body"].read())
    data[len(data) // 2] ^= 0xFF
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=obj["Metadata"])


def sha256_of_object(server, bucket: str, key: str) -> tuple[str, str]:
    """(sha256 of the body, sha256 recorded in its metadata)."""
    import hashlib
    obj = server.client().get_object(Bucket=bucket, Key=key)
    return hashlib.sha256(obj["Body"].read()).hexdigest(), obj["Metadata"].get("sha256", "")


def save_weights(p: Project, code: str) -> None:
    python(f"import torch; sd = torch.load({str(p.checkpoint())!r}, weights_only=True); {code}")


def nudge_weights(p: Project, delta: float) -> None:
    save_weights(p, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + {delta};"
                    f"torch.save(sd, {str(p.checkpoint())!r})")


@pytest.fixture
def bucket(moto_s3):
    return moto_s3.new_bucket("pipe")


# -- two checkouts, one bucket --------------------------------------------------------------------

def test_second_checkout_reuses_the_engine_from_s3(moto_s3, bucket, tmp_path):
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    first = S3Project(tmp_path / "checkout-a", moto_s3, bucket, prefix)
    second = S3Project(tmp_path / "checkout-b", moto_s3, bucket, prefix)

    run = first.doit("deploy:local")
    assert len(run.engines()) == 1 and "deploy:local" in run.ran(), run.out
    assert {"build", "publish", "deploy"} <= set(first.kinds())
    key = first.engine_record()["key"]
    assert first.stored_engines() == [key]
    keys = first.keys()
    assert "fingerprints/local.json" in keys and "models/tiny/onnx.json" in keys
    assert not (first.artifacts / "store").exists()  # nothing went to a local store by accident

    run = second.doit("deploy:local")
    assert list(run.engines().values()) == ["cache-hit"], run.out  # the engine was ensured ...
    assert "cache hit" in run.out, run.out  # ... and reported a hit
    kinds = second.kinds()
    assert "build" not in kinds and "publish" not in kinds, second.events()
    hits = [e for e in second.events() if e["event"] == "cache-hit"]
    assert hits and hits[0]["key"] == key and f"s3://{bucket}/{prefix}" in hits[0]["why"]
    assert "deploy:local" in run.ran() and second.active() == key == first.active()
    assert first.stored_engines() == [key]  # nothing new published
    assert not (second.artifacts / "logs" / "builds").exists()  # no build log: nothing was built


# -- a flipped byte in S3 ------------------------------------------------------------------------

def corrupt_engine_then_fresh_checkout(server, bucket: str, tmp_path: Path) -> tuple[S3Project, str, str]:
    """Checkout a deploys (builds, publishes); a byte of the stored engine is flipped behind the
    store's back (its recorded sha256 kept); checkout b's first deploy must catch it before use."""
    prefix = f"heal-{uuid.uuid4().hex[:6]}"
    first = S3Project(tmp_path / "a", server, bucket, prefix)
    first.doit("deploy:local")
    key = first.engine_record()["key"]
    engine_obj = first.engine_blob_key(key)
    blob_name = engine_obj[len(prefix) + 1:]
    flip_byte(server, bucket, engine_obj)
    body_sha, recorded = sha256_of_object(server, bucket, engine_obj)
    assert body_sha != recorded  # the bucket now lies: metadata says one thing, bytes another

    # The engine task of a fresh checkout only HEADs (a hit: the metadata still matches the
    # manifest); the bytes are verified when deploy downloads them, before anything is staged.
    second = S3Project(tmp_path / "b", server, bucket, prefix)
    run = second.doit("deploy:local", check=False)
    assert run.returncode != 0, run.out
    assert "cache hit" in run.out  # the HEAD-only check could not know
    assert "Traceback" not in run.out, run.out
    # the warning names the entry; the failure names the engine, the store and the way out
    assert f"kiln: WARNING: store entry {blob_name} was corrupt" in run.out, run.out
    assert f"moved it to quarantine/{blob_name}" in run.out
    reason = json.loads(server.client().get_object(
        Bucket=bucket, Key=f"{prefix}/quarantine/{blob_name}.reason.json")["Body"].read())
    assert reason["entry"] == blob_name and "own sha256" in reason["reason"]
    failed = [l for l in run.out.splitlines() if l.startswith("  FAILED  deploy:local: ")]
    assert failed and "corrupt" in failed[0] and key[:12] in failed[0], run.out
    assert f"s3://{bucket}/" in failed[0]
    assert "fix: run again" in run.out
    assert second.active() is None  # nothing half-deployed
    releases = second.root / "deploy" / "tiny" / "releases"
    assert not releases.exists() or not list(releases.iterdir())  # no release, no staging left over
    assert key not in second.stored_engines()  # the bad entry was discarded
    assert first.active() == key  # the device that already had a verified copy keeps serving it
    return second, key, engine_obj


def test_flipped_byte_in_a_stored_engine_is_caught_then_rebuilt(moto_s3, bucket, tmp_path):
    """Detected before use, the entry discarded; the next run rebuilds and republishes it."""
    second, key, engine_obj = corrupt_engine_then_fresh_checkout(moto_s3, bucket, tmp_path)
    run = second.doit("deploy:local", check=False)
    assert run.returncode == 0, run.out
    assert len(run.engines()) == 1, run.out
    builds = [e for e in second.events() if e["event"] == "build"]
    assert builds and builds[-1]["key"] == key, second.events()
    assert second.active() == key
    body_sha, recorded = sha256_of_object(moto_s3, bucket, second.engine_blob_key(key))
    assert body_sha == recorded  # the store object is fixed ...
    manifest = json.loads(moto_s3.client().get_object(
        Bucket=bucket, Key=f"{second.prefix}/engines/{key[:2]}/{key}/manifest.json")["Body"].read())
    assert manifest["sha256"] == body_sha  # ... and agrees with its manifest
    assert second.doit("deploy:local").ran() == set()  # and then it is a no-op again


# -- cache-check across a retrain, from a CI worker with an empty checkout -------------------------

def test_cache_check_follows_the_store_through_a_retrain(moto_s3, bucket, tmp_path):
    prefix = f"ci-{uuid.uuid4().hex[:6]}"
    build = S3Project(tmp_path / "build-server", moto_s3, bucket, prefix)
    build.doit("fingerprint")
    build.doit("export")
    assert build.stored_engines() == []

    def check(p: Project, name: str, expect_rc: int) -> tuple[dict, ET.Element]:
        junit = tmp_path / f"{name}.xml"
        run = p.doit("cache-check", "--json", "--junit", str(junit), check=False)
        assert (run.returncode == 0) == (expect_rc == 0), run.out
        report = report_of(run)
        assert report["store"] == f"s3://{bucket}/{prefix}"
        suite = ET.parse(junit).getroot()
        assert suite.tag == "testsuite"
        failures = sum(r["status"] != "hit" for r in report["engines"])
        assert int(suite.get("failures")) == failures == len(suite.findall("testcase/failure"))
        assert int(suite.get("tests")) == len(report["engines"]) == len(suite.findall("testcase"))
        return report, suite

    # 1. exported, no engine anywhere: miss, exit 1
    report, _ = check(build, "1-miss", 1)
    (row,) = report["engines"]
    assert not report["ok"] and row["status"] == "miss" and row["targets"] == ["local"]
    assert row["key"] not in build.stored_engines()

    # 2. the engine is built: hit, exit 0
    build.doit("engine")
    first_key = build.engine_record()["key"]
    assert build.stored_engines() == [first_key]
    report, suite = check(build, "2-hit", 0)
    hit = report["engines"][0]
    assert report["ok"] and hit == {**row, "status": "hit", "why": "engine in the store", "profile": hit["profile"]}
    assert row["profile"] is None and hit["profile"]["engine_bytes"] > 0  # a miss has no profile
    assert row["key"] == first_key

    # 3. new weights: `doit export` publishes the new ONNX; a CI worker that never probed any
    #    device and has an empty artifacts folder learns fingerprints and ONNX from the store
    nudge_weights(build, 0.02)
    run = build.doit("export")
    assert "export:tiny" in run.ran()
    new_onnx = json.loads((build.artifacts / "onnx" / "tiny.json").read_text())["onnx_sha256"]
    record = json.loads(moto_s3.client().get_object(
        Bucket=bucket, Key=f"{prefix}/models/tiny/onnx.json")["Body"].read())
    assert record["onnx_sha256"] == new_onnx
    # its own checkout: the same fleet file, no checkpoints, an empty artifacts folder
    worker = S3Project(tmp_path / "ci-worker", moto_s3, bucket, prefix)
    assert worker.fleet.read_text() == build.fleet.read_text() and not (worker.root / "ckpt").exists()
    report, suite = check(worker, "3-retrained", 1)
    (row,) = report["engines"]
    assert row["status"] == "miss" and row["targets"] == ["local"] and new_onnx[:12] in row["why"]
    assert row["key"] != first_key and row["key"] not in build.stored_engines()
    assert row["hardware_class"] == build.engine_record()["class"]
    (failure,) = suite.findall("testcase/failure")
    assert "local" in failure.get("message") and "miss" in failure.get("message")
    assert not (worker.artifacts / "fingerprints").exists()  # it probed nothing
    assert not (worker.artifacts / "onnx").exists()

    # 4. the build server builds it: the worker sees the very key it reported as missing
    build.doit("engine")
    assert build.engine_record()["key"] == row["key"]
    assert sorted(build.stored_engines()) == sorted([first_key, row["key"]])
    report, _ = check(worker, "4-rebuilt", 0)
    assert report["ok"] and report["engines"][0]["key"] == row["key"]


# -- the store itself is unusable ------------------------------------------------------------------

def _assert_one_clear_store_error(run, bucket: str, what: str, fix: str, secrets: list[str]) -> None:
    assert run.returncode != 0, run.out
    assert what in run.out and bucket in run.out and fix in run.out, run.out
    assert "Traceback" not in run.out, run.out
    for secret in secrets:
        assert secret not in run.out
    # every failed task either names the store problem or did not run because of it: one cause
    failed = [l.split(": ", 1)[1] for l in run.out.splitlines() if l.startswith("  FAILED  ")]
    causes = {why for why in failed if not why.startswith("not run: depends on failed")}
    assert len(causes) == 1 and what in causes.pop(), run.out
    assert "deploy:local" in run.out.split("enginekiln summary")[1]


def test_missing_bucket_fails_with_one_clear_error(moto_s3, tmp_path):
    missing = f"kiln-missing-{uuid.uuid4().hex[:8]}"
    p = S3Project(tmp_path, moto_s3, missing, "p")
    run = p.doit("deploy:local", check=False)
    _assert_one_clear_store_error(run, missing, "does not exist", f"aws s3 mb s3://{missing}",
                                  [FAKE_SECRET])
    assert p.active() is None
    # follow the fix: create the bucket; the next run publishes everything a CI worker needs,
    # although the failed run had already recorded the fingerprint and the export locally
    moto_s3.client().create_bucket(Bucket=missing)
    run = p.doit("deploy:local")
    assert p.active() == p.engine_record()["key"]
    keys = p.keys()
    assert {"fingerprints/local.json", "models/tiny/onnx.json"} <= set(keys), keys
    assert p.stored_engines() == [p.active()]
    assert p.doit("cache-check").returncode == 0


@pytest.mark.parametrize("fault", ["missing bucket", "rejected credentials"])
def test_cache_check_exits_2_when_it_cannot_check(moto_s3, bucket, tmp_path, fault):
    """An outage is not a miss: CI must be able to tell them apart (exit 2 vs 1), and stdout
    still carries one JSON document saying the store was not checked."""
    secret = "kiln-WRONG-secret-" + uuid.uuid4().hex
    if fault == "missing bucket":
        p = S3Project(tmp_path, moto_s3, f"kiln-missing-{uuid.uuid4().hex[:8]}", "p")
        code, report, stderr = p.doit_json("cache-check", "--json")
    else:
        p = S3Project(tmp_path, moto_s3, bucket, "p",
                      env={"AWS_ACCESS_KEY_ID": "AKIAKILNWRONGKEY0000", "AWS_SECRET_ACCESS_KEY": secret})
        with moto_s3.enforce_auth():
            code, report, stderr = p.doit_json("cache-check", "--json")
    assert code == 2, stderr
    assert report["checked"] is False and not report["ok"] and report["engines"] == []
    reason = "does not exist" if fault == "missing bucket" else "rejected the credentials"
    assert reason in report["error"] and reason in stderr
    assert "Traceback" not in stderr and secret not in stderr + json.dumps(report)


def test_bad_credentials_fail_with_one_clear_error_and_no_secret(moto_s3, bucket, tmp_path):
    secret = "kiln-WRONG-secret-" + uuid.uuid4().hex
    p = S3Project(tmp_path, moto_s3, bucket, "p",
                  env={"AWS_ACCESS_KEY_ID": "AKIAKILNWRONGKEY0000", "AWS_SECRET_ACCESS_KEY": secret})
    with moto_s3.enforce_auth():
        run = p.doit("deploy:local", check=False)
    _assert_one_clear_store_error(run, bucket, "rejected the credentials", "AWS_ACCESS_KEY_ID",
                                  [secret, FAKE_SECRET])
    assert p.active() is None
