"""Artifact stores: the contract (base), a local folder (local), S3 (s3).

`open_store(url)` picks the store for a URL. boto3 is imported only when an S3
store is opened, so importing this package stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from kiln.errors import StoreError
from kiln.stores.base import EntryInfo, Store, check_name
from kiln.stores.local import LocalStore

__all__ = ["EntryInfo", "LocalStore", "Store", "check_name", "open_store"]


def open_store(url: str, *, base_dir: Path | str = ".") -> Store:
    """Store for a URL: `file://path` (relative to `base_dir`) or `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
        return LocalStore(path if path.is_absolute() else Path(base_dir) / path)
    if parsed.scheme == "s3":
        from kiln.stores.s3 import S3Store  # boto3 is imported only when an S3 store is used
        return S3Store.from_url(url)
    raise StoreError(f"unsupported store url {url!r}",
                     hint="use file://<folder> or s3://<bucket>/<prefix> in [store] url")
