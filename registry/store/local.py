"""Blobs as files in a local folder: ``<root>/sha256/ab/cdef...`` (the digest, split for fan-out)."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from registry import faults
from registry.errors import BlobStoreError
from registry.store.base import BlobStore, BlobWriter


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing the range out, do not wait


@functools.cache
def _sync_file_range() -> Any:
    """Linux's sync_file_range(2) through ctypes, or None elsewhere (the standard library has
    no binding). ctypes releases the GIL around the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here: commands that write no blob do not pay for it

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a written range to disk, without waiting for it. Only
    a hint: durability still comes from the fsync at commit, so a failure is ignored."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class LocalBlobWriter(BlobWriter):
    # Written data is sent to the disk as it goes, every WRITEBACK_EVERY bytes, without
    # waiting: a composition writes from a background thread, so the disk works while the
    # next layers are computed, and the fsync before the rename has little left to do (it
    # was a third of an 8-input `exact` compose of 7B-sized LoRAs).
    WRITEBACK_EVERY = 16 * 1024 * 1024

    def __init__(self, store: "LocalBlobStore"):
        self._store = store
        store.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="incoming-")
        super().__init__(Path(name), os.fdopen(fd, "wb"))
        self._sent = 0

    def write(self, data: bytes | memoryview) -> None:
        super().write(data)
        written = self.sink.bytes_written
        if written - self._sent >= self.WRITEBACK_EVERY:
            self._file.flush()
            start_writeback(self._file.fileno(), self._sent, written - self._sent)
            self._sent = written

    def commit(self) -> str:
        digest = self.sink.hexdigest()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        faults.point("blob-written")
        final = self._store.blob_path(digest)
        if final.is_file() and final.stat().st_size == self.sink.bytes_written:
            self._tmp_path.unlink()  # content addressing: the same bytes are already stored
        else:  # absent, or damaged (not a file, wrong size): the verified new copy replaces it
            if final.is_dir():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self._tmp_path, 0o444)  # blobs are immutable
            os.replace(self._tmp_path, final)
            _fsync_dir(final.parent)
        self._done = True
        faults.point("blob-stored")
        return digest


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)
        self.tmp_dir = root / "tmp"

    def blob_path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest[2:]

    def writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def local_path(self, digest: str, verified: bool = True) -> Path:  # readers check the digest
        path = self.blob_path(digest)
        if not path.is_file():
            raise BlobStoreError(f"blob sha256:{digest} is missing from {self.root}: run `pem verify --all`")
        return path

    def delete(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    def modified_at(self, digest: str) -> float:
        return self.blob_path(digest).stat().st_mtime

    def temporary_files(self) -> Iterator[tuple[Path, float]]:
        """Leftovers of writers that never committed (crashed), with their modification time."""
        if self.tmp_dir.is_dir():
            for path in sorted(self.tmp_dir.iterdir()):
                try:
                    yield path, path.stat().st_mtime
                except FileNotFoundError:  # committed (renamed) meanwhile
                    continue

    def digests(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for fan in sorted(base.iterdir()):
            if not fan.is_dir() or len(fan.name) != 2:
                continue  # not ours: gc and verify look only at blobs
            for blob in sorted(fan.iterdir()):
                if len(blob.name) == 62:
                    yield fan.name + blob.name
