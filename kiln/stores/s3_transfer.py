"""Large S3 transfers for `S3Store`: parallel multipart upload, parallel ranged download.

Both keep a bounded window of parts in flight (`max_workers + 2`), so memory stays
at a few parts whatever the file size, and both hash the bytes in order as they
pass, in the same single read pass. Ranged reads are pinned to one object version
with `If-Match: <etag>`; a changed object fails with 412 and the caller retries.
Botocore errors propagate for the caller to map to StoreError.
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable

import botocore.exceptions

log = logging.getLogger(__name__)

MAX_PARTS = 10_000  # S3's limit per multipart upload


def upload_multipart(client, parts_client, bucket: str, key: str, path: Path, *, size: int,
                     metadata: dict, part_size: int, max_workers: int, conditional: dict,
                     verify: Callable[[str], None], report: Callable[[int], None]) -> None:
    """Upload `path` in parts (`parts_client` sends them, `client` does the rest). `verify(sha256)`
    sees the digest of the bytes actually sent before the upload is completed (raise to refuse
    them); `report(done)` after each part.
    On any failure (or interrupt) the multipart upload is aborted: nothing becomes visible."""
    part_size = max(part_size, -(-size // MAX_PARTS))
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=metadata)["UploadId"]
    try:
        digest, done, parts = hashlib.sha256(), 0, []
        window: deque = deque()
        with ThreadPoolExecutor(max_workers, thread_name_prefix="kiln-s3-put") as pool, \
                open(path, "rb") as f:
            number = 0
            while chunk := f.read(part_size):
                digest.update(chunk)
                number += 1
                window.append((number, len(chunk), pool.submit(
                    parts_client.upload_part, Bucket=bucket, Key=key, UploadId=upload_id,
                    PartNumber=number, Body=chunk)))
                del chunk
                while len(window) >= max_workers + 2:
                    done += _collect_part(window, parts)
                    report(done)
            while window:
                done += _collect_part(window, parts)
                report(done)
        verify(digest.hexdigest())
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts}, **conditional)
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("could not abort the multipart upload of %s (%s); a bucket lifecycle "
                        "rule for incomplete uploads will clean it up", key, type(exc).__name__)
        raise


def _collect_part(window: deque, parts: list) -> int:
    number, length, future = window.popleft()
    parts.append({"PartNumber": number, "ETag": future.result()["ETag"]})
    return length


def download_ranged(client, bucket: str, key: str, etag: str, *, size: int, out: BinaryIO,
                    digest, part_size: int, max_workers: int,
                    report: Callable[[int], None]) -> int:
    """Parallel ranged GETs of one object version into `out`, in order, feeding `digest`.
    Returns the number of bytes written (the caller checks it against `size`)."""
    def fetch(start: int, end: int) -> bytes:
        body = client.get_object(Bucket=bucket, Key=key, IfMatch=etag,
                                 Range=f"bytes={start}-{end}")["Body"]
        try:
            return body.read()
        finally:
            body.close()

    done = 0
    window: deque = deque()
    with ThreadPoolExecutor(max_workers, thread_name_prefix="kiln-s3-get") as pool:
        try:
            for start in range(0, size, part_size):
                window.append(pool.submit(fetch, start, min(start + part_size, size) - 1))
                while len(window) >= max_workers + 2:
                    done += _write_part(window.popleft(), out, digest)
                    report(done)
            while window:
                done += _write_part(window.popleft(), out, digest)
                report(done)
        except BaseException:
            for future in window:
                future.cancel()
            raise
    return done


def _write_part(future, out: BinaryIO, digest) -> int:
    data = future.result()
    digest.update(data)
    out.write(data)
    return len(data)
