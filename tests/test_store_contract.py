"""One contract suite for every store backend (kiln.store.Store).

Backends: `local` (LocalStore in tmp_path), `moto` (S3Store against moto's S3 server
on loopback, real HTTP) and `external` (S3Store against the endpoint named by
KILN_TEST_S3_URL=s3://bucket/prefix [+ KILN_S3_ENDPOINT_URL], with the credentials of
the shell that runs pytest; skipped when unset).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from kiln.errors import CorruptEntry, StoreError
from kiln.stores.base import StaleDigest, Store, engine_entry, onnx_entry, staging_entry
from kiln.stores.local import LocalStore
from tests.racing import race
from tests.s3server import FAKE_SECRET, ORIGINAL_ENV, free_port, patched_env

MB = 1 << 20
EXTERNAL_URL = os.environ.get("KILN_TEST_S3_URL")
EXTERNAL_ENDPOINT = os.environ.get("KILN_S3_ENDPOINT_URL")
# urllib labels a request body as a form unless told otherwise (and moto then parses it as one)
OCTETS = {"Content-Type": "application/octet-stream"}
SMALL_PARTS = {"multipart_threshold": 5 * MB, "part_size": 5 * MB}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class Backend:
    """A store factory plus the behind-the-back powers a test needs."""

    kind: str
    s3 = False
    # moto checks If-None-Match on CompleteMultipartUpload before assembling the parts,
    # without a lock: two concurrent multipart writers can both succeed (measured: 10 of
    # 20 rounds). Single-part PutObject: 0 of 200. AWS S3, MinIO and LocalStore are atomic.
    atomic_multipart_create = True

    def make(self, **kwargs) -> Store:
        raise NotImplementedError

    def corrupt(self, store: Store, name: str) -> None:
        """Flip one byte of the stored payload without touching its recorded digest."""
        raise NotImplementedError

    def leftovers(self, store: Store) -> list[str]:
        """Partial uploads the store left behind (temp blobs, open multipart uploads)."""
        raise NotImplementedError


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, *, progress=None, **_s3_only) -> Store:
        store = LocalStore(self.root, progress=progress)
        store.check()
        return store

    def corrupt(self, store, name):
        blob = (self.root / "entries" / name).resolve()
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))

    def leftovers(self, store):
        return [p.name for p in (self.root / "blobs").iterdir() if p.name.startswith(".")]


class S3Backend(Backend):
    s3 = True

    def __init__(self, kind: str, url: str, endpoint: str | None, raw_client, env: dict) -> None:
        self.kind, self.url, self.endpoint, self.raw, self.env = kind, url, endpoint, raw_client, env
        self.atomic_multipart_create = kind != "moto"

    def make(self, **kwargs) -> Store:
        from kiln.stores.s3 import S3Store
        kwargs.setdefault("endpoint_url", self.endpoint)
        kwargs.setdefault("max_attempts", 3)
        store = S3Store.from_url(self.url, **kwargs)
        store.check()
        return store

    def key(self, store, name):
        return f"{store.prefix}/{name}" if store.prefix else name

    def corrupt(self, store, name):
        key = self.key(store, name)
        obj = self.raw.get_object(Bucket=store.bucket, Key=key)
        data = bytearray(obj["Body"].read())
        data[len(data) // 2] ^= 0xFF
        self.raw.put_object(Bucket=store.bucket, Key=key, Body=bytes(data), Metadata=obj["Metadata"])

    def leftovers(self, store):
        ups = self.raw.list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/")
        return [u["Key"] for u in ups.get("Uploads", [])]


@pytest.fixture(params=["local", "moto", "external"])
def backend(request, tmp_path):
    if request.param == "local":
        yield LocalBackend(tmp_path / "store")
        return
    if request.param == "moto":
        server = request.getfixturevalue("moto_s3")
        bucket = server.new_bucket()
        yield S3Backend("moto", f"s3://{bucket}/t-{uuid.uuid4().hex[:8]}", server.endpoint,
                        server.client(), {})
        return
    if not EXTERNAL_URL:
        pytest.skip("external S3 endpoint not configured: set KILN_TEST_S3_URL=s3://bucket/prefix "
                    "(and KILN_S3_ENDPOINT_URL for MinIO etc.) to run the contract against it")
    import boto3
    from botocore.config import Config
    request.getfixturevalue("moto_s3")  # the env is scrubbed for the session: restore the shell's
    with patched_env({**{k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                           "AWS_DEFAULT_REGION")}, **ORIGINAL_ENV}):
        raw = boto3.client("s3", endpoint_url=EXTERNAL_ENDPOINT, config=Config(
            s3={"addressing_style": "path"} if EXTERNAL_ENDPOINT else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required"))
        backend = S3Backend("external", f"{EXTERNAL_URL.rstrip('/')}/t-{uuid.uuid4().hex[:8]}",
                            EXTERNAL_ENDPOINT, raw, dict(ORIGINAL_ENV))
        yield backend
        try:  # clean up what this test wrote
            store = backend.make()
            for name in store.list():
                store.delete(name)
        except StoreError:
            pass


@pytest.fixture
def store(backend):
    return backend.make()


# -- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, 12 * MB + 123], ids=["empty", "1B", "1kB", "12MB-multipart"])
def test_put_get_round_trip(backend, tmp_path, size):
    store = backend.make(**SMALL_PARTS)
    data = os.urandom(size)
    name = onnx_entry(sha(data))
    assert store.put_file(name, write(tmp_path / "src", data), sha256=sha(data)) is True
    got = store.get_file(name, tmp_path / "out" / "dest.onnx", sha256=sha(data))
    assert (tmp_path / "out" / "dest.onnx").read_bytes() == data
    assert (got.sha256, got.size) == (sha(data), size)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dest.onnx"]  # no temp left


def test_put_without_expected_sha_records_the_digest(store, tmp_path):
    data = os.urandom(3000)
    assert store.put_file("fingerprints/orin-01.json", write(tmp_path / "f", data))
    assert store.info("fingerprints/orin-01.json").sha256 == sha(data)
    assert store.get_bytes("fingerprints/orin-01.json") == data


def test_multipart_without_expected_sha(backend, tmp_path):
    store = backend.make(**SMALL_PARTS)
    data = os.urandom(11 * MB)
    assert store.put_file("engines/ab/abc/engine", write(tmp_path / "e", data))
    assert store.info("engines/ab/abc/engine").sha256 == sha(data)
    store.get_file("engines/ab/abc/engine", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_multipart_parts_are_hashed_once(backend, tmp_path):
    """The store's own sha256 pass is the only hash over the parts: they go with an unsigned
    payload (no second sha256 for the signature); the requests around them stay signed."""
    if not backend.s3:
        pytest.skip("a local folder signs nothing")
    store = backend.make(**SMALL_PARTS)
    data = os.urandom(11 * MB)
    payload_hashes = []
    for client in (store.client, store.parts_client):
        client.meta.events.register("before-send.s3", lambda request, **kw: payload_hashes.append(
            (request.method, "uploadId" in request.url and "partNumber" in request.url,
             request.headers.get("X-Amz-Content-SHA256", b""))))
    assert store.put_file("engines/ab/abd/engine", write(tmp_path / "e", data), sha256=sha(data))
    parts = [h for method, is_part, h in payload_hashes if is_part]
    others = [h for method, is_part, h in payload_hashes if not is_part]
    assert len(parts) == 3 and set(parts) == {b"UNSIGNED-PAYLOAD"}
    assert others and b"UNSIGNED-PAYLOAD" not in others
    store.get_file("engines/ab/abd/engine", tmp_path / "back", sha256=sha(data))
    assert (tmp_path / "back").read_bytes() == data


def test_info_reads_no_payload(backend, tmp_path):
    store = backend.make(**SMALL_PARTS)
    data = os.urandom(6 * MB)
    store.put_file("engines/aa/k1/engine", write(tmp_path / "e", data))
    if backend.s3:
        received = []
        store.client.meta.events.register("after-call.s3", lambda http_response, **kw:
                                          received.append(len(http_response.content or b"")))
        sent = []
        store.client.meta.events.register("before-send.s3", lambda request, **kw:
                                          sent.append(request.method))
    info = store.info("engines/aa/k1/engine")
    assert (info.name, info.sha256, info.size) == ("engines/aa/k1/engine", sha(data), len(data))
    assert store.info("engines/aa/nope/engine") is None
    assert store.exists("engines/aa/k1/engine") and not store.exists("engines/aa/nope/engine")
    if backend.s3:
        assert sent == ["HEAD", "HEAD", "HEAD", "HEAD"]
        assert sum(received) == 0


# -- never overwrite, races ----------------------------------------------------------

def test_no_overwrite(store, tmp_path):
    assert store.put_bytes("models/m/onnx.json", b"first") is True
    assert store.put_bytes("models/m/onnx.json", b"second") is False
    assert store.get_bytes("models/m/onnx.json") == b"first"
    assert store.info("models/m/onnx.json").sha256 == sha(b"first")


def test_overwrite_replaces(store):
    store.put_bytes("models/m/onnx.json", b"first")
    assert store.put_bytes("models/m/onnx.json", b"second, longer", overwrite=True) is True
    assert store.get_bytes("models/m/onnx.json") == b"second, longer"
    assert store.info("models/m/onnx.json") .sha256 == sha(b"second, longer")


@pytest.mark.parametrize("size", [2000, 6 * MB], ids=["single", "multipart"])
def test_lost_race_exactly_one_wins(backend, tmp_path, size):
    stores = [backend.make(**SMALL_PARTS), backend.make(**SMALL_PARTS)]  # two publishers
    for round_ in range(3 if size < MB else 1):
        name = f"timing-caches/ab/race-{round_}.cache"
        payloads = [os.urandom(size), os.urandom(size)]
        srcs = [write(tmp_path / f"src{i}", p) for i, p in enumerate(payloads)]
        barrier, results, errors = threading.Barrier(2), [None, None], []

        def publish(i):
            try:
                barrier.wait()
                results[i] = stores[i].put_file(name, srcs[i], sha256=sha(payloads[i]))
                # both callers end with the winner's verified content
                stores[i].get_file(name, tmp_path / f"got{i}")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=publish, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        final = stores[0].info(name).sha256
        got = [sha((tmp_path / f"got{i}").read_bytes()) for i in (0, 1)]
        if size >= MB and not backend.atomic_multipart_create:
            # see Backend: both may "win", one after the other, so a reader may see either
            # payload, but always a whole, verified one
            assert True in results and final in {sha(p) for p in payloads}
            assert set(got) <= {sha(p) for p in payloads}
            continue
        assert got[0] == got[1] == final
        assert sorted(results) == [False, True]
        assert final == sha(payloads[results.index(True)])


def test_expected_sha_mismatch_refused(backend, tmp_path):
    for kwargs, size in (({}, 100), (SMALL_PARTS, 11 * MB)):
        store = backend.make(**kwargs)
        data = os.urandom(size)
        with pytest.raises(StoreError, match="do not match the expected sha256"):
            store.put_file("onnx/00/wrong.onnx", write(tmp_path / "src", data), sha256=sha(b"other"))
        assert store.info("onnx/00/wrong.onnx") is None
        assert backend.leftovers(store) == []


# -- corruption and interruption ---------------------------------------------------------

@pytest.mark.parametrize("size", [5000, 11 * MB], ids=["single", "multipart"])
def test_corrupt_entry_is_quarantined(backend, tmp_path, size, caplog):
    store = backend.make(**SMALL_PARTS)
    data = os.urandom(size)
    name = engine_entry("cd" + sha(data)[2:])
    store.put_file(name, write(tmp_path / "src", data))
    backend.corrupt(store, name)
    assert store.info(name).sha256 == sha(data)  # the record still claims the old digest
    dest = tmp_path / "out" / "engine"
    with caplog.at_level("WARNING"), pytest.raises(CorruptEntry):
        store.get_file(name, dest)
    assert not dest.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert store.info(name) is None and name not in store.list()
    assert any("corrupt" in r.getMessage() and "quarantine/" in r.getMessage() for r in caplog.records)
    reason = json.loads(quarantined(store, name + ".reason.json"))
    assert reason["entry"] == name and reason["recorded_sha256"] == sha(data) != reason["actual_sha256"]
    assert len(quarantined(store, name)) == size  # the damaged bytes are kept, not deleted
    # a miss, not a wedge: publishing again works
    assert store.put_file(name, tmp_path / "src") is True
    assert store.get_file(name, dest).sha256 == sha(data)


def test_get_with_wrong_expected_sha_is_a_stale_record_not_corruption(store, tmp_path):
    """The entry matches its own digest: the caller's expectation is stale. Nothing is removed."""
    store.put_bytes("onnx/ab/x.onnx", b"payload")
    with pytest.raises(StaleDigest) as caught:
        store.get_file("onnx/ab/x.onnx", tmp_path / "dest", sha256=sha(b"something else"))
    assert isinstance(caught.value, KeyError) and not isinstance(caught.value, CorruptEntry)
    assert not (tmp_path / "dest").exists()
    assert store.get_file("onnx/ab/x.onnx", tmp_path / "dest").sha256 == sha(b"payload")
    assert store.list("quarantine/") == [] and not quarantined_names(store)


def quarantined(store: Store, name: str) -> bytes:
    """Bytes of `quarantine/<name>` (LocalStore: a plain file under the root; S3: an object)."""
    from kiln.stores.base import quarantine_entry
    from kiln.stores.local import LocalStore
    if isinstance(store, LocalStore):
        return (store.root / quarantine_entry(name)).read_bytes()
    return store.client.get_object(Bucket=store.bucket, Key=store._key(quarantine_entry(name)))["Body"].read()


def quarantined_names(store: Store) -> list[str]:
    from kiln.stores.local import LocalStore
    if isinstance(store, LocalStore):
        base = store.root / "quarantine"
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.exists() else []
    return store.list("quarantine/")


def test_local_blobs_are_read_only(tmp_path):
    from kiln.stores.local import LocalStore
    store = LocalStore(tmp_path / "store")
    store.put_bytes("blobs/ab/x", b"payload")
    blob = store.root / "blobs" / sha(b"payload")
    assert blob.stat().st_mode & 0o777 == 0o444


def test_interrupted_upload_leaves_no_entry(backend, tmp_path):
    calls = []

    def interrupt(name, done, total):
        calls.append(done)
        raise KeyboardInterrupt("operator pressed Ctrl-C")

    store = backend.make(progress=interrupt, **SMALL_PARTS)
    data = os.urandom(16 * MB)
    with pytest.raises(KeyboardInterrupt):
        store.put_file("engines/ee/big/engine", write(tmp_path / "src", data), sha256=sha(data))
    assert calls and calls[0] < len(data)
    assert store.info("engines/ee/big/engine") is None
    assert store.list("engines/") == []
    assert backend.leftovers(store) == []
    # and nothing is wedged: a normal publish afterwards works
    store = backend.make(**SMALL_PARTS)
    assert store.put_file("engines/ee/big/engine", tmp_path / "src", sha256=sha(data))


def test_progress_reports_bytes(backend, tmp_path):
    seen = []
    store = backend.make(progress=lambda n, d, t: seen.append((n, d, t)), **SMALL_PARTS)
    data = os.urandom(11 * MB)
    store.put_file("onnx/aa/p.onnx", write(tmp_path / "src", data))
    assert seen and seen[-1] == ("onnx/aa/p.onnx", len(data), len(data))
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


# -- list, delete, missing ----------------------------------------------------------------

def test_list_by_prefix(store):
    names = ["engines/aa/k1/engine", "engines/aa/k1/manifest.json", "engines/ab/k2/engine",
             "onnx/aa/x.onnx", "fingerprints/orin-01.json"]
    for n in names:
        store.put_bytes(n, n.encode())
    assert store.list() == sorted(names)
    assert store.list("engines/") == sorted(names[:3])
    assert store.list("engines/aa/") == names[:2]
    assert store.list("nothing/") == []


def test_delete(store):
    store.put_bytes("onnx/aa/x.onnx", b"x")
    store.put_bytes("onnx/aa/y.onnx", b"y")
    store.delete("onnx/aa/x.onnx")
    store.delete("onnx/aa/x.onnx")  # absent: ignored
    store.delete("never/was.json")
    assert store.info("onnx/aa/x.onnx") is None
    assert store.list() == ["onnx/aa/y.onnx"]
    assert store.put_bytes("onnx/aa/x.onnx", b"x again") is True


def test_get_missing_is_keyerror(store, tmp_path):
    store.put_bytes("onnx/aa/present.onnx", b"x")
    with pytest.raises(KeyError):
        store.get_file("onnx/aa/missing.onnx", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert store.info("onnx") is None  # a folder of entries is not an entry


def test_invalid_names_rejected(store, tmp_path):
    for bad in ("../escape", "/abs", "a/../b", ".hidden", "a//b"):
        with pytest.raises(StoreError):
            store.put_bytes(bad, b"x")


# -- failures of the store itself -------------------------------------------------------------

def test_missing_bucket(backend, tmp_path):
    if not backend.s3:
        blocker = write(tmp_path / "file-not-folder", b"")
        with pytest.raises(StoreError, match="cannot use the local store folder"):
            LocalStore(blocker / "store").check()
        return
    from kiln.stores.s3 import S3Store
    bucket = f"kiln-missing-{uuid.uuid4().hex[:10]}"
    with patched_env(backend.env):
        store = S3Store(bucket, "p", endpoint_url=backend.endpoint, max_attempts=2)
        with pytest.raises(StoreError) as err:
            store.check()
    text = str(err.value)
    assert bucket in text and "does not exist" in text and "aws s3 mb" in text
    assert isinstance(err.value.__cause__, Exception)  # chained


def test_bad_credentials(backend, request):
    if not backend.s3:
        pytest.skip("a local folder has no credentials")
    from kiln.stores.s3 import S3Store
    secret = "kiln-WRONG-secret-" + uuid.uuid4().hex
    store_url = backend.url
    with patched_env({**backend.env, "AWS_ACCESS_KEY_ID": "AKIAKILNWRONGKEY0000",
                      "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": None,
                      "AWS_PROFILE": None}):
        store = S3Store.from_url(store_url, endpoint_url=backend.endpoint, max_attempts=2)
        if backend.kind == "moto":
            with request.getfixturevalue("moto_s3").enforce_auth():
                with pytest.raises(StoreError) as err:
                    store.check()
        else:
            with pytest.raises(StoreError) as err:
                store.check()
    text = str(err.value) + repr(store) + repr(err.value)
    assert "rejected the credentials" in text and store.bucket in text
    assert "fix:" in text
    assert secret not in text and FAKE_SECRET not in text


def test_unreachable_endpoint(aws_env_scrubbed):
    from kiln.stores.s3 import S3Store
    port = free_port()  # nothing listens there
    store = S3Store("kiln-bucket", "p", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2,
                    connect_timeout=2)
    with pytest.raises(StoreError) as err:
        store.check()
    assert f"127.0.0.1:{port}" in str(err.value) and "kiln-bucket" in str(err.value)
    assert "KILN_S3_ENDPOINT_URL" in str(err.value)


def test_throttling_is_retried_then_clear_error(slowdown_s3, tmp_path):
    from kiln.stores.s3 import S3Store
    store = S3Store("kiln-bucket", "p", endpoint_url=slowdown_s3.endpoint, max_attempts=3)
    with pytest.raises(StoreError) as err:
        store.check()
    assert slowdown_s3.requests == 3  # botocore retried (standard mode) before giving up
    text = str(err.value)
    assert "SlowDown" in text and "3 attempts" in text and "kiln-bucket" in text
    assert "retry later" in text
    with pytest.raises(StoreError, match="503|SlowDown"):
        store.info("onnx/aa/x.onnx")
    with pytest.raises(StoreError, match="SlowDown"):
        store.put_file("onnx/aa/x.onnx", write(tmp_path / "x", b"x"))
    assert slowdown_s3.requests == 9


def test_constructing_does_no_io_and_repr_has_no_secret(moto_s3):
    from kiln.stores.s3 import S3Store
    store = S3Store.from_url("s3://some-bucket/some/prefix", endpoint_url="http://127.0.0.1:9")
    assert (store.bucket, store.prefix) == ("some-bucket", "some/prefix")
    assert store._client is None
    assert FAKE_SECRET not in repr(store) and "some-bucket" in repr(store)
    with pytest.raises(StoreError):
        S3Store.from_url("s3:///nobucket")


def test_endpoint_from_env(moto_s3):
    from kiln.stores.s3 import S3Store
    from kiln.stores import open_store
    bucket = moto_s3.new_bucket()
    with patched_env({"KILN_S3_ENDPOINT_URL": moto_s3.endpoint}):
        store = open_store(f"s3://{bucket}/env")
        assert isinstance(store, S3Store) and store.endpoint_url == moto_s3.endpoint
        store.check()
        assert store.put_bytes("a/b.json", b"{}") and store.get_bytes("a/b.json") == b"{}"


# -- devices without credentials ---------------------------------------------------------------

def test_presigned_get_and_put_then_promote(backend, tmp_path):
    if not backend.s3:
        pytest.skip("a local folder has no URLs; devices get files over the transport")
    store = backend.make()
    data = os.urandom(4000)
    store.put_bytes("onnx/aa/model.onnx", data)
    url = store.presign_get("onnx/aa/model.onnx", expires=60)
    with patched_env({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}):
        with urllib.request.urlopen(url, timeout=10) as resp:  # plain HTTP, no credentials
            assert resp.read() == data
        staged = staging_entry(uuid.uuid4().hex)
        put_url = store.presign_put(staged, expires=60)
        engine = os.urandom(5000)
        req = urllib.request.Request(put_url, data=engine, method="PUT", headers=OCTETS)
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    assert store.list("engines/") == []  # nothing reaches the cache before promote()
    final = engine_entry("ef" + sha(engine)[2:])
    assert store.promote(staged, final, sha(engine)) is True
    assert store.get_bytes(final) == engine and store.info(final).sha256 == sha(engine)
    assert store.info(staged) is None
    with pytest.raises(StoreError, match="staging/ only"):
        store.presign_put("engines/aa/x/engine", expires=60)


def test_promote_refuses_wrong_sha(backend, tmp_path):
    store = backend.make()
    staged = staging_entry(uuid.uuid4().hex)
    uploaded = os.urandom(3000)
    if backend.s3:  # as a device would: a presigned PUT, no metadata
        req = urllib.request.Request(store.presign_put(staged, 60), data=uploaded, method="PUT",
                                     headers=OCTETS)
        urllib.request.urlopen(req, timeout=10).close()
    else:
        store.put_bytes(staged, uploaded)
    final = engine_entry("0f" * 32)
    with pytest.raises(CorruptEntry, match="refusing to promote"):
        store.promote(staged, final, sha(b"what the device claimed it built"))
    assert store.info(final) is None and store.info(staged) is None
    with pytest.raises(KeyError):
        store.promote(staging_entry("never-uploaded"), final, sha(uploaded))


def test_promote_does_not_overwrite(store):
    store.put_bytes("engines/aa/k/engine", b"already here")
    staged = staging_entry(uuid.uuid4().hex)
    store.put_bytes(staged, b"device build")
    assert store.promote(staged, "engines/aa/k/engine", sha(b"device build")) is False
    assert store.get_bytes("engines/aa/k/engine") == b"already here"
    assert store.info(staged) is None


def test_false_from_put_always_means_a_readable_entry(backend, tmp_path):
    """Two entries with the same bytes (LocalStore shares one blob); one is found corrupt.
    Publishing the other again must leave it readable, whatever put_file returns."""
    store = backend.make()
    data = os.urandom(4000)
    src = write(tmp_path / "src", data)
    store.put_file("engines/aa/k1/engine", src)
    store.put_file("engines/aa/k2/engine", src)
    backend.corrupt(store, "engines/aa/k1/engine")
    with pytest.raises(CorruptEntry):
        store.get_file("engines/aa/k1/engine", tmp_path / "d1")
    store.put_file("engines/aa/k2/engine", src, sha256=sha(data))
    assert store.get_file("engines/aa/k2/engine", tmp_path / "d2").sha256 == sha(data)
    assert (tmp_path / "d2").read_bytes() == data


# -- the controller's one file hash and one atomic write (kiln.files), used by every store ------

def test_atomic_file_publishes_only_on_success(tmp_path):
    from kiln.files import atomic_file, atomic_write, sha256_file
    dest = tmp_path / "sub" / "record.json"
    atomic_write(dest, "old ✓")
    with pytest.raises(ValueError):
        with atomic_file(dest) as f:
            f.write(b"half-written")
            raise ValueError("refuse these bytes")
    assert dest.read_text() == "old ✓"
    assert [p.name for p in dest.parent.iterdir()] == ["record.json"]  # temp removed
    with atomic_file(dest, mode=0o600) as f:
        f.write(b"new")
        assert dest.read_text() == "old ✓"  # not visible before the block ends
    assert dest.read_bytes() == b"new" and (dest.stat().st_mode & 0o777) == 0o600
    assert sha256_file(dest) == sha(b"new")


def test_hash_cache_reads_a_file_once(tmp_path):
    from kiln.errors import HashError
    from kiln.keys import HashCache
    data = os.urandom(100_000)
    src = write(tmp_path / "ckpt.pt", data)
    cache = HashCache(tmp_path / "cache" / "hashes.json")
    assert cache.sha256(src) == sha(data) and cache.bytes_read == len(data)
    again = HashCache(tmp_path / "cache" / "hashes.json")  # a new run: the recorded stat matches
    assert again.sha256(src) == sha(data) and again.bytes_read == 0
    os.utime(src, ns=(1, 1))  # touched: re-read once, same digest
    assert again.sha256(src) == sha(data) and again.bytes_read == len(data)
    with pytest.raises(HashError):
        again.sha256(tmp_path / "missing.pt")


def test_a_corrupt_small_entry_read_as_bytes_is_quarantined(backend, tmp_path):
    """get_bytes (manifests, records: one GET on S3) verifies and quarantines like get_file."""
    store = backend.make()
    name = "engines/ab/k/manifest.json"
    data = b'{"sha256": "' + b"0" * 64 + b'"}'
    assert store.put_bytes(name, data)
    backend.corrupt(store, name)
    with pytest.raises(CorruptEntry):
        store.get_bytes(name)
    assert store.info(name) is None
    assert json.loads(quarantined(store, name + ".reason.json"))["recorded_sha256"] == sha(data)
    with pytest.raises(KeyError):
        store.get_bytes("engines/ab/nothing/manifest.json")


# -- mutable records: compare-and-swap (build leases, kiln.stores.lease) ------------------

def test_record_create_read_replace_delete_by_version(store):
    name = "leases/ab/" + "ab" * 32 + ".json"
    assert store.read_record(name) is None
    first = store.create_exclusive(name, b'{"v": 1}')
    assert first and store.read_record(name) == (b'{"v": 1}', first)
    assert store.create_exclusive(name, b'{"v": 2}') is None           # exists: nobody overwrites it
    assert store.read_record(name) == (b'{"v": 1}', first)
    assert store.replace_if(name, b'{"v": 3}', "0" * 32) is None         # not the version held
    second = store.replace_if(name, b'{"v": 3}', first)
    assert second and second != first and store.read_record(name) == (b'{"v": 3}', second)
    assert store.replace_if(name, b'{"v": 4}', first) is None           # a stale version loses
    assert store.delete_if(name, first) is False                        # never deletes a newer version
    assert store.read_record(name) == (b'{"v": 3}', second)
    assert store.delete_if(name, second) is True
    assert store.read_record(name) is None
    assert store.delete_if(name, second) is False
    assert store.replace_if(name, b'{"v": 5}', second) is None          # gone: nothing to replace
    assert store.create_exclusive(name, b'{"v": 6}')                    # free again


def test_record_races_have_exactly_one_winner(backend):
    racers = 6
    stores = [backend.make() for _ in range(racers)]
    name = "leases/cd/" + "cd" * 32 + ".json"

    created = race(racers, lambda i: stores[i].create_exclusive(name, f'{{"racer": {i}}}'.encode()))
    winners = [i for i, etag in enumerate(created) if etag]
    assert len(winners) == 1, created
    data, etag = stores[0].read_record(name)
    assert data == f'{{"racer": {winners[0]}}}'.encode() and etag == created[winners[0]]

    replaced = race(racers, lambda i: stores[i].replace_if(name, f'{{"taker": {i}}}'.encode(), etag))
    winners = [i for i, new in enumerate(replaced) if new]
    assert len(winners) == 1, replaced
    assert stores[0].read_record(name)[0] == f'{{"taker": {winners[0]}}}'.encode()
