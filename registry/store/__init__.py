"""Blob stores. :func:`open_store` picks the backend from the configured location."""

from __future__ import annotations

from pathlib import Path

from registry.store.base import BlobStore, BlobWriter
from registry.store.local import LocalBlobStore


def open_store(location: str) -> BlobStore:
    return LocalBlobStore(Path(location))


__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "open_store"]
