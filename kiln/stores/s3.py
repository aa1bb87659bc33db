"""`S3Store`: the store contract (kiln.stores.base.Store) on any S3-compatible endpoint.

Layout: entry `<name>` is the object `<prefix>/<name>`; its sha256 is recorded as
object metadata (`x-amz-meta-sha256`) when it is written, so `info()` is one
HEAD request and never reads the payload.

Writes never overwrite unless asked: `PutObject` / `CompleteMultipartUpload` carry
`If-None-Match: *` (S3 conditional writes, 2024; also MinIO and moto). A 412 means
another writer won the race: `put_file` returns False and the caller uses the
winner's entry. On a server that rejects conditional writes (`NotImplemented`,
501) the store falls back, once per instance, to HEAD-then-PUT; that leaves a race
window between the HEAD and the PUT in which two writers can both write (the last
one wins). The verification HEAD after every upload narrows it: a writer that finds
someone else's digest on the entry returns False.

Reads download to a temp file next to `dest`, hash while writing, and rename only
if the bytes match the recorded digest (and the caller's). Bytes that do not match
their own recorded digest are corrupt: the object is copied to `quarantine/<name>`
(with a `.reason.json`) and then removed from its name, a warning is logged and
CorruptEntry is raised. A caller's digest that differs from an intact object's own
record is a stale expectation: StaleDigest, nothing is touched. `dest` is left
untouched either way.

Large files go in parts (parallel, `part_size`, `max_workers`) with the sha256
computed in the same single read pass that feeds the parts when the caller gives
the expected digest (the usual case: publishers know it); without it the file is
hashed first, because the digest has to be in the metadata before the first part
is sent. The parts are sent with an unsigned payload (see `parts_client`): that
digest is the one hash pass over the bytes. Downloads use parallel ranged GETs pinned to the ETag seen by the HEAD
(`If-Match`), hashed in order as the parts arrive.

Devices without AWS credentials get short-lived presigned URLs: `presign_get` for an
entry and `presign_put` for a `staging/` name only; the controller then calls
`promote()`, which downloads and verifies the staged bytes and publishes exactly
those bytes under the final name. (A server-side copy would save the upload, but
moto and several S3-compatible servers ignore `x-amz-copy-source-if-match`, so the
copied bytes could differ from the verified ones.)

Credentials, region, profile and endpoint come from the standard AWS chain
(env, `AWS_PROFILE`, `~/.aws/config`, instance roles, `AWS_ENDPOINT_URL_S3`...);
`KILN_S3_ENDPOINT_URL` overrides the endpoint (MinIO, moto) and switches to
path-style addressing. Nothing of ours stores, logs or prints a secret.

boto3 is imported only by this module (and its helpers s3_errors, s3_transfer), which
kiln.stores.open_store imports lazily.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import boto3
import botocore.exceptions
from botocore.config import Config

from kiln.errors import CorruptEntry, StoreError
from kiln.files import atomic_file, sha256_file
from kiln.stores.base import EntryInfo, StaleDigest, Store, check_name, quarantine_entry
from kiln.stores.s3_errors import (BOTO_ERRORS, ENDPOINT_ENV, is_missing, is_not_implemented,
                                   is_precondition, store_error)
from kiln.stores.s3_transfer import download_ranged, upload_multipart

log = logging.getLogger(__name__)

META_SHA = "sha256"
MB = 1 << 20
MIN_PART = 5 * MB          # S3's minimum part size (all parts but the last)

Progress = Callable[[str, int, int], None]
"""progress(name, bytes_done, bytes_total), called from the caller's thread."""

def _is_bad_param(exc: botocore.exceptions.ClientError) -> bool:
    """A server that does not know a conditional header may answer 400 instead of 501."""
    return exc.response.get("Error", {}).get("Code") in ("InvalidArgument", "InvalidRequest", "BadRequest")


def _is_conflict(exc: botocore.exceptions.ClientError) -> bool:
    """AWS answers 409 ConditionalRequestConflict to a conditional write racing another one."""
    return exc.response.get("Error", {}).get("Code") == "ConditionalRequestConflict" or \
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 409


class S3Store(Store):
    """An S3 bucket + prefix. Constructing one does no I/O; the client is made on first use."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, profile: str | None = None,
                 max_attempts: int | None = None, connect_timeout: float = 10,
                 read_timeout: float = 60, multipart_threshold: int = 8 * MB,
                 part_size: int = 8 * MB, max_workers: int = 10,
                 conditional_writes: bool | None = None,
                 progress: Progress | None = None) -> None:
        if not bucket:
            raise StoreError("the S3 store url names no bucket",
                             hint="use s3://<bucket>/<prefix> in [store] url")
        if part_size < MIN_PART:
            raise StoreError(f"S3 part_size {part_size} is below S3's minimum of {MIN_PART} bytes",
                             hint="use part_size >= 5 MiB")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_name(self.prefix)
        self.endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
        self.region = region
        self.profile = profile
        env_attempts = os.environ.get("AWS_MAX_ATTEMPTS")
        self.max_attempts = int(max_attempts or (env_attempts if env_attempts else 5))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.multipart_threshold = max(multipart_threshold, 1)
        self.part_size = part_size
        self.max_workers = max(1, max_workers)
        # None = try conditional writes, fall back if the server says it cannot.
        self._conditional = conditional_writes
        self.progress = progress
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None
        self._parts_client = None
        self._session = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "S3Store":
        """`s3://bucket[/prefix]`; everything else from the AWS chain, `KILN_S3_ENDPOINT_URL` and kwargs."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"not an S3 store url: {url!r}",
                             hint="use s3://<bucket>/<prefix> in [store] url")
        return cls(parsed.netloc, parsed.path.strip("/"), **kwargs)

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store({self.url!r}{where})"

    # -- client -----------------------------------------------------------------
    @property
    def client(self):
        """The boto3 S3 client (thread-safe; made on first use)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    @property
    def parts_client(self):
        """The client that sends multipart parts: like `client`, but the parts' bodies are not
        hashed again for the request signature (`UNSIGNED-PAYLOAD`; botocore signs payloads
        only when no checksum rides along or the connection is plain HTTP). The store already
        hashes every byte it sends, in order, against the entry's sha256 before completing, and
        every read verifies the whole object; signing the parts was a second sha256 pass over
        the file (0.14 s of CPU for 200 MB, half the client's own work on such a put).
        Made on first use from the same session (~10 ms; the first client costs ~250 ms)."""
        if self._parts_client is None:
            self.client  # the first client makes the session both share
            with self._lock:
                if self._parts_client is None:
                    self._parts_client = self._make_client(sign_payload=False)
        return self._parts_client

    def _make_client(self, *, sign_payload: bool = True):
        s3_cfg = {"addressing_style": "path"} if self.endpoint_url else {}
        if not sign_payload:
            s3_cfg["payload_signing_enabled"] = False
        config = Config(
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            max_pool_connections=self.max_workers + 4,
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3=s3_cfg)
        try:
            if self._session is None:
                self._session = boto3.session.Session(profile_name=self.profile, region_name=self.region)
            return self._session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"cannot set up the S3 client for {self.url}: {type(exc).__name__}",
                             hint="check AWS_PROFILE / AWS_REGION and your AWS config "
                                  "(`aws configure list`)", store=self.url) from exc

    def _key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _error(self, exc: BaseException, action: str, name: str | None = None) -> StoreError:
        """One StoreError for a foreign exception; the caller raises it `from exc`."""
        return store_error(exc, action, url=self.url, bucket=self.bucket, endpoint_url=self.endpoint_url,
                           max_attempts=self.max_attempts, name=name)

    # -- Store contract -----------------------------------------------------------
    def check(self) -> None:
        """One request (ListObjectsV2, MaxKeys=1): bucket exists, credentials valid, listing allowed."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1,
                                        Prefix=f"{self.prefix}/" if self.prefix else "")
        except BOTO_ERRORS as exc:
            raise self._error(exc, "list the store") from exc

    def _head(self, name: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except BOTO_ERRORS as exc:
            if is_missing(exc):
                return None
            raise self._error(exc, "read the entry's record", name) from exc

    def info(self, name: str) -> EntryInfo | None:
        head = self._head(name)
        if head is None and (alias := self.resolve(name)) is not None:
            name, head = alias, self._head(alias)
        if head is None:
            return None
        return EntryInfo(name, head.get("Metadata", {}).get(META_SHA, ""), int(head["ContentLength"]))

    def put_file(self, name, path, *, sha256=None, overwrite=False) -> bool:
        key = self._key(name)
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read {path} to store it as {name}: {exc.strerror}",
                             store=self.url) from exc
        conditional = not overwrite and self._conditional is not False
        if not overwrite and not conditional and self.info(name) is not None:
            return False  # fallback mode: HEAD-then-PUT (see the module docstring)
        try:
            sha = self._upload(name, key, path, size, sha256, conditional)
        except botocore.exceptions.ClientError as exc:
            if conditional and is_precondition(exc):
                log.debug("lost the race for %s: another writer stored it first", name)
                return False
            if conditional and self._conditional is None and is_not_implemented(exc):
                log.warning("S3 bucket %r does not support conditional writes; falling back to "
                            "HEAD-then-PUT (racy)", self.bucket)
                self._conditional = False
                return self.put_file(name, path, sha256=sha256, overwrite=overwrite)
            raise self._error(exc, "store the entry", name) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "store the entry", name) from exc
        if conditional:
            self._conditional = True
        # Verify: the entry now carries our digest and size.
        info = self.info(name)
        if info is None:
            raise StoreError(f"entry {name} vanished right after it was stored",
                             hint="another process deleted it; retry", store=self.url)
        if info.sha256 != sha or info.size != size:
            if overwrite:
                log.info("entry %s was overwritten again by another writer right after ours", name)
                return True
            log.warning("entry %s holds another writer's bytes (sha256 %s); ours (%s) lost the race",
                        name, info.sha256[:12], sha[:12])
            return False
        return True

    def _upload(self, name: str, key: str, path: Path, size: int, expected: str | None,
                conditional: bool) -> str:
        """Upload `path`; returns its sha256. Raises StoreError (nothing visible) on a digest
        mismatch; lets botocore errors through for the caller to map."""
        cond = {"IfNoneMatch": "*"} if conditional else {}
        if size < self.multipart_threshold:
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            self._refuse_mismatch(name, expected, sha)
            with self.transferring("put", name, size) as shown:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                       Metadata={META_SHA: sha}, **cond)
                shown.update(len(data))
            return sha
        sha = expected or sha256_file(path)
        with self.transferring("put", name, size) as shown:
            upload_multipart(self.client, self.parts_client, self.bucket, key, path, size=size,
                             metadata={META_SHA: sha},
                             part_size=self.part_size, max_workers=self.max_workers, conditional=cond,
                             verify=lambda actual: self._refuse_mismatch(name, sha, actual),
                             report=shown.update)
        return sha

    def _refuse_mismatch(self, name: str, expected: str | None, actual: str) -> None:
        if expected and actual != expected:
            raise StoreError(f"refusing to store {name}: its bytes do not match the expected sha256",
                             hint="the source file changed or was corrupted while being published; "
                                  "rebuild it", store=self.url, expected=expected, actual=actual)

    def get_file(self, name, dest, *, sha256=None) -> EntryInfo:
        dest = Path(dest)
        for attempt in (1, 2):
            head = self._head(name)
            if head is None and attempt == 1 and (alias := self.resolve(name)) is not None:
                name, head = alias, self._head(alias)
            if head is None:
                raise KeyError(name)
            recorded = head.get("Metadata", {}).get(META_SHA, "")
            size = int(head["ContentLength"])
            # An object written by someone else (a device's presigned PUT) has no record; the
            # caller's digest is then the only reference, and one of the two is required.
            if not recorded and not sha256:
                raise StoreError(f"store entry {name} has no recorded sha256 to verify it against",
                                 hint="pass the expected sha256 (it was not written through the store)",
                                 store=self.url)
            if recorded and sha256 and recorded != sha256:
                raise StaleDigest(f"store entry {name} holds other bytes than expected (its record is stale)",
                                  hint="re-read the record that named these bytes", store=self.url,
                                  recorded=recorded, expected=sha256)
            try:
                actual = self._download(name, self._key(name), head["ETag"], size, dest,
                                        recorded, sha256)
            except botocore.exceptions.ClientError as exc:
                if is_precondition(exc) and attempt == 1:
                    log.debug("entry %s changed during the download; retrying", name)
                    continue
                if is_missing(exc):
                    raise KeyError(name) from None
                raise self._error(exc, "read the entry", name) from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise self._error(exc, "read the entry", name) from exc
            return EntryInfo(name, actual, size)
        raise StoreError(f"entry {name} kept changing while being downloaded",
                         hint="another process is rewriting it; retry", store=self.url)

    def get_bytes(self, name: str) -> bytes:
        """A small entry (a manifest, a record) in one GET: the recorded sha256 comes back with the
        body, so no HEAD is needed first. Verified like get_file; a corrupt one is quarantined."""
        check_name(name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            data = response["Body"].read()
        except BOTO_ERRORS as exc:
            if is_missing(exc):
                if self.resolve(name) is not None:  # a read alias: the general path resolves it
                    return super().get_bytes(name)
                raise KeyError(name) from None
            raise self._error(exc, "read the entry", name) from exc
        recorded = response.get("Metadata", {}).get(META_SHA, "")
        if not recorded:
            raise StoreError(f"store entry {name} has no recorded sha256 to verify it against",
                             hint="it was not written through the store", store=self.url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded:
            self._drop_corrupt(name, recorded, actual, response.get("ETag", ""))
        return data

    def _drop_corrupt(self, name: str, recorded: str, actual: str, etag: str) -> None:
        where = quarantine_entry(name)
        self.quarantine(name, {"reason": "bytes do not match their own sha256",
                               "recorded_sha256": recorded, "actual_sha256": actual}, etag=etag)
        log.warning("store entry %s was corrupt (downloaded bytes: sha256 %s, recorded %s); moved it to %s",
                    name, actual[:12] or "-", recorded[:12] or "-", where)
        raise CorruptEntry(f"store entry {name} is corrupt and has been moved to {where}",
                           hint="it will be rebuilt or re-published on the next run",
                           store=self.url, recorded=recorded or None, actual=actual or None)

    def quarantine(self, name: str, reason: dict, *, etag: str | None = None) -> None:
        """Server-side copy to `quarantine/<name>` (metadata kept), the reason next to it, then
        the object is removed from its name, pinned to the ETag that was judged (`If-Match`
        where the server supports it) so a fresh write by someone else is never removed."""
        key, dest = self._key(name), self._key(quarantine_entry(name))
        head = self._head(name)
        if head is None or (etag and head["ETag"] != etag):
            return  # gone, or already replaced by other bytes: nothing of what we judged is left
        etag = head["ETag"]
        try:
            self.client.copy_object(Bucket=self.bucket, Key=dest, MetadataDirective="COPY",
                                    CopySource={"Bucket": self.bucket, "Key": key}, CopySourceIfMatch=etag)
            self.client.put_object(Bucket=self.bucket, Key=dest + ".reason.json",
                                   Body=self.reason_bytes(name, reason))
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            except botocore.exceptions.ClientError as exc:
                if is_precondition(exc):
                    return  # replaced meanwhile: the new bytes stay
                if not is_not_implemented(exc) and not _is_bad_param(exc):
                    raise
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ParamValidationError:  # an older botocore: no IfMatch
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except BOTO_ERRORS as exc:
            if is_missing(exc) or is_precondition(exc):
                return
            raise self._error(exc, "quarantine the corrupt entry", name) from exc

    def _download(self, name: str, key: str, etag: str, size: int, dest: Path,
                  recorded: str, expected: str | None) -> str:
        """Hashed in order into a temp file; renamed to `dest` only if verified."""
        digest = hashlib.sha256()
        with atomic_file(dest) as out, self.transferring("get", name, size) as shown:
            if size < self.multipart_threshold:
                body = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)["Body"]
                try:
                    while chunk := body.read(MB):
                        digest.update(chunk)
                        out.write(chunk)
                finally:
                    body.close()
                shown.update(size)
            else:
                done = download_ranged(self.client, self.bucket, key, etag, size=size, out=out,
                                       digest=digest, part_size=self.part_size,
                                       max_workers=self.max_workers, report=shown.update)
                if done != size:
                    raise StoreError(f"entry {name} came back short ({done} of {size} bytes)",
                                     hint="retry; the server or the network cut the transfer",
                                     store=self.url)
            actual = digest.hexdigest()
            if recorded and actual != recorded:
                self._drop_corrupt(name, recorded, actual, etag)  # raises: dest untouched
            if expected and actual != expected:  # an unrecorded object (a presigned upload)
                raise CorruptEntry(f"store entry {name} does not hold the expected bytes",
                                   hint="upload it again", store=self.url, expected=expected, actual=actual)
        return actual

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except BOTO_ERRORS as exc:
            if not is_missing(exc):
                raise self._error(exc, "delete the entry", name) from exc

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=base + prefix):
                names.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))
        except BOTO_ERRORS as exc:
            raise self._error(exc, "list entries") from exc
        return sorted(names)

    # -- devices without credentials ---------------------------------------------
    def presign_get(self, name: str, expires: int = 900) -> str:
        """A URL that lets anyone GET the entry's bytes for `expires` seconds (verify them
        against `info(name).sha256` on the device). An alias (`engine_entry`) is resolved first."""
        if self._head(name) is None and (alias := self.resolve(name)) is not None:
            name = alias
        return self._presign("get_object", name, expires)

    def presign_put(self, staging_name: str, expires: int = 900) -> str:
        """A URL that lets a device PUT bytes to a `staging/` name (see kiln.stores.base.staging_entry)
        for `expires` seconds. The bytes reach the cache only through `promote()`."""
        if not staging_name.startswith("staging/"):
            raise StoreError(f"presigned uploads go to staging/ only, not {staging_name!r}",
                             hint="use kiln.stores.base.staging_entry(token) and promote() after verifying",
                             store=self.url)
        return self._presign("put_object", staging_name, expires)

    def _presign(self, method: str, name: str, expires: int) -> str:
        if not 0 < expires <= 7 * 24 * 3600:
            raise StoreError(f"presigned URL lifetime {expires}s is out of range",
                             hint="use 1..604800 seconds (short-lived is better)", store=self.url)
        try:
            return self.client.generate_presigned_url(
                method, Params={"Bucket": self.bucket, "Key": self._key(name)}, ExpiresIn=expires)
        except BOTO_ERRORS as exc:
            raise self._error(exc, "presign a URL", name) from exc

    # -- mutable records (kiln.stores.base.Store.create_exclusive) -------------------
    # Plain objects (no sha256 record), versioned by their ETag: creates carry `If-None-Match: *`,
    # replaces and deletes `If-Match: <etag>` (AWS S3 since 2024, MinIO, moto). On a server that
    # rejects the condition the store checks first and writes after (racy: a small window in
    # which two controllers can both think they won; the engine manifest's own conditional
    # create still keeps one engine per key).

    def read_record(self, name: str) -> tuple[bytes, str] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            return response["Body"].read(), response["ETag"]
        except BOTO_ERRORS as exc:
            if is_missing(exc):
                return None
            raise self._error(exc, "read the record", name) from exc

    def _record_call(self, name: str, action: str, call, unconditional) -> bool:
        """Run a conditional call: True if it went through, False if the condition failed."""
        try:
            call()
            return True
        except botocore.exceptions.ClientError as exc:
            if is_precondition(exc) or _is_conflict(exc) or (is_missing(exc) and action != "create"):
                return False
            if not (is_not_implemented(exc) or _is_bad_param(exc)):
                raise self._error(exc, f"{action} the record", name) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, f"{action} the record", name) from exc
        log.warning("S3 server of bucket %r rejects conditional %s of %s; checking first instead (racy)",
                    self.bucket, action, name)
        return unconditional()

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        key = self._key(name)
        put = lambda **cond: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **cond)
        done = self._record_call(name, "create", lambda: put(IfNoneMatch="*"),
                                 lambda: self.read_record(name) is None and (put() or True))
        return self._version_if_ours(name, data) if done else None

    def replace_if(self, name: str, data: bytes, etag: str) -> str | None:
        key = self._key(name)
        put = lambda **cond: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **cond)
        done = self._record_call(name, "replace", lambda: put(IfMatch=etag),
                                 lambda: self._holds(name, etag) and (put() or True))
        return self._version_if_ours(name, data) if done else None

    def delete_if(self, name: str, etag: str) -> bool:
        key = self._key(name)
        delete = lambda **cond: self.client.delete_object(Bucket=self.bucket, Key=key, **cond)
        return self._record_call(name, "delete", lambda: delete(IfMatch=etag),
                                 lambda: self._holds(name, etag) and (delete() or True))

    def _holds(self, name: str, etag: str) -> bool:
        now = self.read_record(name)
        return now is not None and now[1] == etag

    def _version_if_ours(self, name: str, data: bytes) -> str | None:
        """The etag of the record just written, read back: None if another writer's bytes are
        already there (a server whose check and write are not one step, e.g. moto)."""
        now = self.read_record(name)
        return now[1] if now is not None and now[0] == data else None

    # promote(staging_name, final_name, sha256) comes from Store: download-verify, then
    # put_file the verified local copy (see the module docstring for why not a server-side copy).
