"""What a blob store is: content-addressed, write-once files named by their sha256.

The catalog only ever talks to this interface, so another backend (an S3-compatible bucket
with a local read cache) slots in beside :mod:`registry.store.local` without touching the
rest. Writes go through :meth:`BlobStore.writer`: bytes are hashed while they are written,
and the blob becomes visible under its digest only when :meth:`BlobWriter.commit` has made
it durable. The catalog commits its row after that, never before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Iterator

from registry.safetensors_io import HashingWriter


class BlobWriter(ABC):
    """A blob being written to a local temporary file, hashed on the way. Use as a context
    manager: leaving it without commit discards it."""

    def __init__(self, tmp_path: Path, file: BinaryIO):
        self._tmp_path = tmp_path
        self._file = file
        self.sink = HashingWriter(file)
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)

    @abstractmethod
    def commit(self) -> str:
        """Make the blob durable under its digest and return the digest. If a blob with the
        same digest already exists, the new copy is discarded (content addressing)."""

    def abort(self) -> None:
        """Discard what was written (a no-op after commit)."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()  # a no-op after commit


class BlobStore(ABC):
    location: str

    @abstractmethod
    def writer(self) -> BlobWriter: ...

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def local_path(self, digest: str, verified: bool = True) -> Path:
        """A local file holding the blob, for reading or memory-mapping. Raises BlobStoreError
        when the blob is missing. A remote store checks its cached copy against the digest
        before handing it out unless ``verified`` is False: the caller then hashes what it
        reads itself (registry.store.checked) and reports a mismatch with ``corrupt_hint``."""

    # A remote store keeps local copies it can download again: a read that finds its copy
    # damaged is retried once (registry.store.checked.reading), transparently.
    refetches_damaged = False

    def corrupt_hint(self, digest: str) -> str:
        """What to do about a blob found corrupt while reading it (after any clean-up)."""
        return "run `pem verify`"

    @abstractmethod
    def delete(self, digest: str) -> None: ...

    @abstractmethod
    def digests(self) -> Iterator[str]:
        """Every digest the store holds."""

    @abstractmethod
    def modified_at(self, digest: str) -> float:
        """When the blob was stored (seconds since the epoch): gc spares recent ones."""

    @abstractmethod
    def temporary_files(self) -> Iterator[tuple[Path, float]]:
        """Partial writes left by crashed writers, with their modification times."""

    def size(self, digest: str) -> int:
        """The blob's size in bytes. A remote store answers without downloading the blob."""
        return self.local_path(digest).stat().st_size

    def check(self) -> None:
        """Raise BlobStoreError (one line, with the fix) when the store cannot be used: an
        unreachable endpoint, a missing bucket, denied access. ``pem init`` calls it."""
