"""Truth under faults: records follow bytes, and a store that cannot be poisoned.

Kill points (kiln.faults, `KILN_KILL_AT=<step>`) SIGKILL a real `doit deploy:local`
between any two publish steps; the next clean run must finish the job, and a fresh checkout
sharing the store must see the NEW model's engine. Then the engine store itself: a stale local
record never removes anyone's engine, concurrent publishers agree on one manifest, and a
flipped byte is quarantined (not deleted) and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import pytest

from kiln_project import Project, python
from kiln.errors import CorruptEntry
from kiln.stores.base import (blob_entry, engine_entry, engine_manifest_entry, onnx_entry, onnx_record_entry,
                              reference_entry)
from kiln.faults import ENV, STEPS
from kiln.stores.local import LocalStore


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Shared(Project):
    """A checkout whose store is a shared folder (`[store] url = "file:///..."`)."""

    def __init__(self, root: Path, store: Path, **kwargs) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.store_root = store
        self.extra_env: dict[str, str] = {}
        # every checkout of a test is one controller: one signing key (kiln.signing)
        self.signing_key = store.parent / "controller.key"
        super().__init__(root, extra=f'\n[store]\nurl = "file://{store}"\n'
                                     f'\n[signing]\nkey = "{self.signing_key}"\n', **kwargs)

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.extra_env}

    def doit_killed_at(self, step: str):
        self.extra_env = {ENV: step}
        try:
            return self.doit("deploy:local", check=False)
        finally:
            self.extra_env = {}

    @property
    def store(self) -> LocalStore:
        return LocalStore(self.store_root)

    def record(self, name: str) -> dict:
        return json.loads((self.artifacts / name).read_text())

    def engine_record(self) -> dict:
        return json.loads(next((self.artifacts / "engines").glob("tiny@*.json")).read_text())


def nudge(p: Project, delta: float) -> None:
    python(f"import torch; sd = torch.load({str(p.checkpoint())!r}, weights_only=True);"
           f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + {delta};"
           f"torch.save(sd, {str(p.checkpoint())!r})")


def cache_report(p: Project) -> dict:
    run = p.doit("cache-check", "--json", check=False)
    return json.loads(run.out[run.out.index("{"):run.out.rindex("}") + 1])


def assert_nothing_half_written(store_root: Path) -> None:
    """Every visible entry is complete (its bytes hash to its recorded digest); no temp names."""
    entries = store_root / "entries"
    for path in entries.rglob("*"):
        assert not path.name.startswith("."), f"temporary entry visible: {path}"
        if path.is_symlink() and path.exists():
            assert sha(path.read_bytes()) == os.path.basename(os.readlink(path)), path
    for path in (store_root / "blobs").iterdir():
        assert not path.name.startswith("."), f"temporary blob visible: {path}"
    for manifest in entries.glob("engines/*/*/manifest.json"):  # a manifest names bytes that are there
        named = json.loads(manifest.read_text())["sha256"]
        assert (entries / blob_entry(named)).exists(), manifest


# -- 1. records follow bytes: a kill at every publish step ------------------------------------------

def test_a_kill_at_any_publish_step_leaves_old_or_new_and_the_rerun_finishes(tmp_path):
    store = tmp_path / "shared-store"
    a = Shared(tmp_path / "a", store)
    a.doit("deploy:local")
    for i, step in enumerate(STEPS):
        old_onnx = a.record("onnx/tiny.json")["onnx_sha256"]
        nudge(a, 0.01 * (i + 1))
        before = a.active()
        killed = a.doit_killed_at(step)
        assert killed.returncode == -9, f"{step}: not killed there:\n{killed.out}"
        assert_nothing_half_written(store)
        # the device has a complete release active throughout: the old one, or (killed after the
        # switch) the new one, never a staging folder
        active = a.active()
        assert active is not None and (a.root / "deploy/tiny/releases" / active / "manifest.json").exists(), step
        assert active == before or step in ("deploy:activated", "deploy:checked"), (step, active)
        pointer = json.loads(a.store.get_bytes(onnx_record_entry("tiny")))
        # old or new, the pointer names bytes that are in the store (records follow bytes)
        assert a.store.info(onnx_entry(pointer["onnx_sha256"])) is not None, step
        assert a.store.info(reference_entry(pointer["onnx_sha256"])).sha256 == pointer["reference_sha256"], step

        rerun = a.doit("deploy:local")
        assert "deploy:local" in rerun.ran(), f"{step}: the rerun believed it was up to date:\n{rerun.out}"
        new = a.record("onnx/tiny.json")
        assert new["onnx_sha256"] != old_onnx, step
        s = a.store
        assert s.info(onnx_entry(new["onnx_sha256"])).sha256 == new["onnx_sha256"], step
        assert s.info(reference_entry(new["onnx_sha256"])).sha256 == new["reference_sha256"], step
        assert json.loads(s.get_bytes(onnx_record_entry("tiny")))["onnx_sha256"] == new["onnx_sha256"], step
        assert_nothing_half_written(store)
        key = a.engine_record()["key"]
        assert a.active() == key, step
        if step == "deploy:activated":  # switched but never health-checked: the rerun checks it
            assert "not confirmed by this controller" in rerun.out, rerun.out

        # a CI worker with an empty checkout and the same store sees the NEW model's engine
        ci = Shared(tmp_path / f"ci-{i}", store)
        report = cache_report(ci)
        assert report["ok"] and [r["key"] for r in report["engines"]] == [key], (step, report)


# -- 2. a store that cannot be poisoned ------------------------------------------------------------

def publish(store, key: str, data: bytes, tmp: Path) -> dict:
    from kiln.pipeline.engines import publish_manifest
    src = tmp / f"engine-{sha(data)[:12]}"
    src.write_bytes(data)
    store.put_file(blob_entry(sha(data)), src, sha256=sha(data))
    return publish_manifest(store, key, {"key": key, "sha256": sha(data), "blob": blob_entry(sha(data)),
                                         "size": len(data)})


def test_a_stale_local_record_never_deletes_a_rebuilt_engine_and_deploys_it(tmp_path):
    store = tmp_path / "shared-store"
    a = Shared(tmp_path / "a", store)
    a.doit("deploy:local")
    record = a.engine_record()
    key, sha_a = record["key"], record["sha256"]
    s = a.store
    manifest = json.loads(s.get_bytes(engine_manifest_entry(key)))
    # controller B's later rebuild of the same key: other (still loadable) bytes. An unknown
    # protobuf field (99, varint 1) appended to the ONNX-format engine changes the bytes only.
    engine_b = (tmp_path / "b-engine")
    engine_b.write_bytes(Path(s.root / "entries" / blob_entry(sha_a)).read_bytes() + b"\x98\x06\x01")
    sha_b = sha(engine_b.read_bytes())
    s.delete(engine_manifest_entry(key))
    s.put_file(blob_entry(sha_b), engine_b, sha256=sha_b)
    from kiln.signing import Trust  # B is a controller this one trusts: its manifest is signed
    manifest_b = json.dumps(Trust(a.signing_key).sign({**manifest, "sha256": sha_b, "blob": blob_entry(sha_b),
                                                       "built_on": "b"})).encode()
    s.put_bytes(engine_manifest_entry(key), manifest_b)
    # A's local record still names A's bytes; its device must be deployed again
    assert a.engine_record()["sha256"] == sha_a
    python(f"import shutil; shutil.rmtree({str(a.root / 'deploy')!r})")

    run = a.doit("deploy:local")
    assert "deploy:local" in run.ran(), run.out
    assert s.get_bytes(engine_manifest_entry(key)) == manifest_b  # B's manifest untouched
    assert s.info(blob_entry(sha_b)) is not None and s.info(blob_entry(sha_a)) is not None  # nothing deleted
    assert not (store / "quarantine").exists()
    assert a.engine_record()["sha256"] == sha_b  # the stale record was re-read from the manifest
    release = a.root / "deploy/tiny/releases" / key
    deployed = json.loads((release / "manifest.json").read_text())
    assert deployed["engine_sha256"] == sha_b == sha((release / deployed["engine_file"]).read_bytes())


@pytest.fixture(params=["local", "moto"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    from kiln.stores.s3 import S3Store
    server = request.getfixturevalue("moto_s3")
    s = S3Store.from_url(f"s3://{server.new_bucket()}/race-{uuid.uuid4().hex[:6]}",
                         endpoint_url=server.endpoint, max_attempts=3)
    s.check()
    return s


def test_two_controllers_publishing_one_key_agree_on_one_manifest(store, tmp_path):
    for round_ in range(4):
        key = sha(f"key {round_} {uuid.uuid4()}".encode())
        engines = [os.urandom(3000) + bytes([i]) for i in range(2)]
        barrier, results, errors = threading.Barrier(2), [None, None], []

        def controller(i: int) -> None:
            try:
                barrier.wait()
                results[i] = publish(store, key, engines[i], tmp_path)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=controller, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert results[0] == results[1]  # both end with the same engine
        assert store.list(f"engines/{key[:2]}/{key}/") == [engine_manifest_entry(key)]  # exactly one manifest
        winner = json.loads(store.get_bytes(engine_manifest_entry(key)))
        assert winner == results[0] and winner["sha256"] in {sha(e) for e in engines}
        for e in engines:  # nothing deleted: the loser's blob stays as an orphan
            assert store.info(blob_entry(sha(e))).sha256 == sha(e)
        assert store.get_file(engine_entry(key), tmp_path / "got").sha256 == winner["sha256"]
    assert store.list("quarantine/") == [] and not (tmp_path / "store" / "quarantine").exists()


def test_a_flipped_byte_in_a_blob_is_quarantined_with_a_reason_then_rebuilt(tmp_path):
    from kiln.pipeline.engines import _read_manifest, _blob_present
    store = LocalStore(tmp_path / "store")
    key, built = sha(b"key"), os.urandom(5000)
    publish(store, key, built, tmp_path)
    blob = store.root / "blobs" / sha(built)
    assert blob.stat().st_mode & 0o777 == 0o444
    damaged = bytearray(built)
    damaged[100] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(damaged))
    with pytest.raises(CorruptEntry, match="quarantine/"):
        store.get_file(engine_entry(key), tmp_path / "got")
    assert not (tmp_path / "got").exists()
    moved = store.root / "quarantine" / blob_entry(sha(built))
    assert moved.read_bytes() == bytes(damaged)
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    assert reason["recorded_sha256"] == sha(built) and reason["actual_sha256"] == sha(bytes(damaged))
    # the manifest stays (it is intact) but is a miss now; a rebuild with other bytes replaces it
    manifest = _read_manifest(store, key)
    assert manifest is not None and not _blob_present(store, key, manifest)
    rebuilt = os.urandom(5000)
    assert publish(store, key, rebuilt, tmp_path)["sha256"] == sha(rebuilt)
    assert store.get_file(engine_entry(key), tmp_path / "got").sha256 == sha(rebuilt)
    assert (store.root / "quarantine" / (engine_manifest_entry(key))).exists()  # the old one kept aside
