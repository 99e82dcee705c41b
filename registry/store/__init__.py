"""Blob stores. :func:`open_store` picks the backend from the configured location: a folder
(:mod:`registry.store.local`, the default) or ``s3://BUCKET/PREFIX`` (:mod:`registry.store.s3`,
which imports boto3 only when it first talks to the bucket)."""

from __future__ import annotations

import os
from pathlib import Path

from registry.store.base import BlobStore, BlobWriter
from registry.store.local import LocalBlobStore


def open_store(location: str, *, home: str | os.PathLike[str] | None = None) -> BlobStore:
    """The store at ``location``. ``home`` (the registry's home folder; default ``$PEM_HOME``)
    holds the read cache of a remote store."""
    if location.startswith("s3://"):
        from registry.config import DEFAULT_HOME, ENV_HOME
        from registry.store.s3 import open_s3_store

        home_path = Path(home or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser().absolute()
        return open_s3_store(location, home_path)
    return LocalBlobStore(Path(location))


__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "open_store"]
