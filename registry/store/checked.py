"""Reading a blob with its digest checked on the way.

Every read of blob content that leaves the registry (export, push) or that something is
registered from (compose, port) hashes the bytes it reads and compares the sha256 with the
digest before anything becomes visible. The hash is computed from the reads themselves, so
it costs no second pass over the file: :class:`DigestCheck` is fed the bytes a reader reads,
in file order, and reads only what the reader skipped (the header, tensors it did not need).

A mismatch is a :class:`CorruptBlobError` of one line: the module, the digest expected, the
cause, and the fix the store suggests (``pem verify`` for a local store; a remote store drops
its damaged cached copy, so that the next read downloads it again).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from registry.errors import CorruptBlobError
from registry.store.base import BlobStore

CHUNK = 8 * 1024 * 1024
T = TypeVar("T")


class DigestCheck:
    """The sha256 of one open blob file, fed in file order by a reader; gaps are read here.

    ``feed(offset, data)`` is called with what the reader read at ``offset``; bytes before
    ``offset`` that were never fed are read from ``fd`` first. ``finish`` hashes the rest of
    the file and raises :class:`CorruptBlobError` when the digest or the size is wrong.
    Not thread-safe: one thread feeds it."""

    def __init__(self, store: BlobStore, ref: str, digest: str, fd: int, size: int | None = None):
        self.store, self.ref, self.digest, self.fd = store, ref, digest, fd
        self.expected_size = size
        self.file_size = os.fstat(fd).st_size
        self._hash = hashlib.sha256()
        self._position = 0

    def check_size(self) -> None:
        """Refuse a file whose size differs from the catalog's (truncated, appended to)
        before reading it: its header may not even parse."""
        if self.expected_size is not None and self.file_size != self.expected_size:
            how = "truncated" if self.file_size < self.expected_size else "too long"
            raise self.corrupt(f"{how} ({self.file_size} bytes, the catalog records {self.expected_size})")

    def feed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset > self._position:
            self._read_to(offset)
        view = memoryview(data).cast("B")
        end = offset + view.nbytes
        if end > self._position:  # skip what an earlier read already covered
            self._hash.update(view[self._position - offset:])
            self._position = end

    def _read_to(self, end: int) -> None:
        while self._position < end:
            chunk = os.pread(self.fd, min(CHUNK, end - self._position), self._position)
            if not chunk:
                raise self.corrupt(f"truncated ({self._position} bytes, more expected)")
            self._hash.update(chunk)
            self._position += len(chunk)

    def hash_rest(self) -> None:
        """Hash what no reader asked for, up to the end of the file."""
        self._read_to(self.file_size)

    def finish(self) -> None:
        self.hash_rest()
        self.verify()

    def verify(self) -> None:
        actual = self._hash.hexdigest()
        if actual != self.digest:
            raise self.corrupt(f"sha256 mismatch, its bytes hash to sha256:{actual[:12]}")

    def corrupt(self, cause: str) -> CorruptBlobError:
        return corrupt_blob(self.store, self.ref, self.digest, cause)


def corrupt_blob(store: BlobStore, ref: str, digest: str, cause: str) -> CorruptBlobError:
    return CorruptBlobError(f"blob of {ref} (sha256:{digest}) is corrupt: {cause}; {store.corrupt_hint(digest)}")


def reading(store: BlobStore, read: Callable[[], T]) -> T:
    """``read()``, once more if it found a damaged local copy that the store dropped and can
    download again (a remote store's cache); a second mismatch is raised."""
    try:
        return read()
    except CorruptBlobError:
        if not store.refetches_damaged:
            raise
    return read()


def open_blob(store: BlobStore, digest: str) -> tuple[Path, int]:
    """A local file of the blob, opened for reading, for a reader that checks its digest."""
    path = store.local_path(digest, verified=False)
    return path, os.open(path, os.O_RDONLY)


def copy_blob(store: BlobStore, ref: str, digest: str, size: int | None, target: BinaryIO) -> None:
    """Copy the blob into ``target`` (an open file), checking its digest on the way. On a
    mismatch, ``target`` holds bad bytes: the caller discards it."""

    def copy() -> None:
        target.seek(0)
        target.truncate()
        _copy_blob(store, ref, digest, size, target)

    reading(store, copy)


def _copy_blob(store: BlobStore, ref: str, digest: str, size: int | None, target: BinaryIO) -> None:
    _, fd = open_blob(store, digest)
    try:
        check = DigestCheck(store, ref, digest, fd, size)
        check.check_size()
        position = 0
        while chunk := os.pread(fd, CHUNK, position):
            check.feed(position, chunk)
            target.write(chunk)
            position += len(chunk)
        check.finish()
    finally:
        os.close(fd)


def check_blob(store: BlobStore, ref: str, digest: str, size: int | None) -> None:
    """Read the whole blob and check its digest (for a module registered from a blob whose
    tensors are not otherwise read: a port, a composition that reuses an earlier output)."""
    reading(store, lambda: _check_blob(store, ref, digest, size))


def _check_blob(store: BlobStore, ref: str, digest: str, size: int | None) -> None:
    _, fd = open_blob(store, digest)
    try:
        check = DigestCheck(store, ref, digest, fd, size)
        check.check_size()
        check.finish()
    finally:
        os.close(fd)
