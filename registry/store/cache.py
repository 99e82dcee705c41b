"""A bounded local read cache of blobs: ``<root>/sha256/ab/cdef...``, like the local store.

A remote store (:mod:`registry.store.s3`) hands out files from here, so that callers get a
local file they can ``pread`` or memory-map. A blob is downloaded into ``<root>/tmp``,
hashed on the way, and renamed into place only when its sha256 equals its digest. Cached
files are read-only and checked again (hashed once per process) before they are handed out,
so a file damaged on disk is dropped and downloaded again rather than used.

Several processes may share one cache. Nothing here rewrites a file in place: a file
appears by ``rename`` and disappears by ``unlink``, and a reader that has a file open keeps
reading it after an eviction. Recency is the file's access time, set when the file is handed
out; when the cache exceeds its limit, the least recently used files are unlinked first, except
the one just added and those handed out in the last :attr:`BlobCache.protect_seconds` (a
process may be about to open them). Evictions take an exclusive ``flock`` on ``<root>/.lock``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from registry.errors import BlobStoreError
from registry.safetensors_io import HashingWriter

_HEX = frozenset("0123456789abcdef")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class CacheInfo(NamedTuple):
    """What the cache holds: files and bytes, its limit in bytes and its folder."""

    files: int
    bytes: int
    limit: int
    location: str

    def __str__(self) -> str:
        return f"{self.files} files, {_human(self.bytes)} of {_human(self.limit)} in {self.location}"


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


class BlobCache:
    def __init__(self, root: Path, limit: int, protect_seconds: float = 5.0):
        self.root = root
        self.limit = limit
        self.protect_seconds = protect_seconds
        self.tmp_dir = root / "tmp"
        self._verified: dict[str, tuple[int, int, int, int]] = {}  # digest -> stat of the file hashed

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest[2:]

    # --- reading ---------------------------------------------------------------------------

    def lookup(self, digest: str, check: bool = True) -> Path | None:
        """The cached file of ``digest``, checked and marked as used; None when there is none
        (or it was damaged: then it is removed). ``check`` False skips the hash, for a
        caller that hashes what it reads (and calls ``discard`` on a mismatch)."""
        path = self.path(digest)
        try:
            st = path.stat()
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if check and self._verified.get(digest) != identity:
                if _sha256_file(path) != digest:
                    self._unlink_if_same(path, identity)
                    self._verified.pop(digest, None)
                    return None
                self._verified[digest] = identity
        except FileNotFoundError:  # not cached, or evicted by another process meanwhile
            return None
        self._touch(path, st.st_mtime_ns)
        return path

    def fetch(self, digest: str, download: Callable[[HashingWriter], None], source: str) -> Path:
        """Download ``digest`` with ``download(sink)`` into a temporary file, check its hash
        and move it into the cache; returns the cached file. ``source`` names where it came
        from, for the error message."""
        tmp = self.new_temporary("download-")
        try:
            with open(tmp, "wb") as f:
                sink = HashingWriter(f)
                download(sink)
            actual = sink.hexdigest()
            if actual != digest:
                raise BlobStoreError(
                    f"blob sha256:{digest[:12]} in {source} is corrupt: its bytes hash to sha256:{actual[:12]}; "
                    "nothing was cached: run `pem verify --all`"
                )
            return self.insert(tmp, digest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # --- writing ---------------------------------------------------------------------------

    def new_temporary(self, prefix: str) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=prefix)
        os.close(fd)
        return Path(name)

    def insert(self, tmp: Path, digest: str) -> Path:
        """Move ``tmp``, whose sha256 the caller checked to be ``digest``, into the cache, then
        evict least recently used files beyond the limit."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)  # cached blobs are immutable
        os.replace(tmp, final)
        st = final.stat()
        self._verified[digest] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._touch(final, st.st_mtime_ns)
        self.evict(keep=digest)
        return final

    def discard(self, digest: str) -> None:
        self._verified.pop(digest, None)
        self.path(digest).unlink(missing_ok=True)

    # --- bounding --------------------------------------------------------------------------

    def evict(self, keep: str | None = None) -> list[str]:
        """Unlink least recently used files until the cache fits its limit; returns their digests."""
        evicted: list[str] = []
        with self._lock():
            entries = sorted(self._entries())  # oldest access first
            total = sum(size for _, size, _, _ in entries)
            now = time.time()
            for atime, size, path, digest in entries:
                if total <= self.limit:
                    break
                if digest == keep or now - atime < self.protect_seconds:
                    continue
                path.unlink(missing_ok=True)
                self._verified.pop(digest, None)
                total -= size
                evicted.append(digest)
        return evicted

    def info(self) -> CacheInfo:
        entries = list(self._entries())
        return CacheInfo(len(entries), sum(size for _, size, _, _ in entries), self.limit, str(self.root))

    def clear(self) -> CacheInfo:
        """Unlink every cached file (not the temporary files of writers in flight); returns
        what was removed."""
        files = size_sum = 0
        with self._lock():
            for _, size, path, _ in self._entries():
                path.unlink(missing_ok=True)
                files += 1
                size_sum += size
        self._verified.clear()
        return CacheInfo(files, size_sum, self.limit, str(self.root))

    def temporary_files(self) -> Iterator[tuple[Path, float]]:
        """Leftovers of downloads and writers that never finished (crashed), with their mtimes."""
        if self.tmp_dir.is_dir():
            for path in sorted(self.tmp_dir.iterdir()):
                try:
                    yield path, path.stat().st_mtime
                except FileNotFoundError:  # finished meanwhile
                    continue

    # --- helpers ---------------------------------------------------------------------------

    def _entries(self) -> Iterator[tuple[float, int, Path, str]]:
        """(atime, size, path, digest) of every cached file."""
        base = self.root / "sha256"
        try:
            fans = list(os.scandir(base))
        except FileNotFoundError:
            return
        for fan in fans:
            if len(fan.name) != 2 or not fan.is_dir(follow_symlinks=False):
                continue
            try:
                blobs = list(os.scandir(fan.path))
            except FileNotFoundError:
                continue
            for blob in blobs:
                digest = fan.name + blob.name
                if len(digest) != 64 or not _HEX.issuperset(digest):
                    continue
                try:
                    st = blob.stat(follow_symlinks=False)
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                yield st.st_atime, st.st_size, Path(blob.path), digest

    @staticmethod
    def _touch(path: Path, mtime_ns: int) -> None:
        """Mark as used now: the access time only (the mtime identifies the checked file)."""
        try:
            os.utime(path, ns=(time.time_ns(), mtime_ns))
        except OSError:  # another user's file in a shared cache: recency is best effort
            pass

    @staticmethod
    def _unlink_if_same(path: Path, identity: tuple[int, int, int, int]) -> None:
        try:
            st = path.stat()
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == identity:
                path.unlink()
        except FileNotFoundError:
            pass

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: concurrent evictions may only remove a little too much
            yield
            return
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
