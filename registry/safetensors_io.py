"""Reading and writing safetensors files without torch.

The registry reads metadata (names, dtypes, shapes) from a file's JSON header and copies
tensor bytes with plain file I/O, so registering, listing or exporting never imports torch.

Every blob in the store is a *canonical* safetensors file: tensors sorted by name, packed
back to back, a header written with sorted keys and no metadata other than
``{"format": "pt"}``. The same tensors therefore always give the same bytes, and the sha256 of
those bytes is the module's content digest: a digest over sorted names, dtypes, shapes and
data, whatever order or metadata the original file had.

Every check here is made on untrusted input before anything is written: the header length
is bounded, every offset lies inside the file, tensors neither overlap nor leave gaps (the
same rule as the safetensors library), and every dtype is known.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from registry.errors import InvalidAdapterError

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# Floating dtypes the composition engine accepts, with their torch names.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The largest finite value of each: a composition whose values may exceed it is refused.
FLOAT_MAX = {"F64": 1.7976931348623157e308, "F32": 3.4028234663852886e38, "F16": 65504.0,
             "BF16": 3.3895313892515355e38}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMENSION = 2**31  # no adapter tensor has a larger dimension; a larger one is hostile
CANONICAL_METADATA = {"format": "pt"}
COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; no tensor data is read."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, "file is shorter than a safetensors header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise _bad(path, f"header claims {header_len} bytes but the file has {file_size}")
            raw = f.read(header_len)
    except OSError as exc:
        raise InvalidAdapterError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge integers, hostile nesting
        raise _bad(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    tensors = {name: _parse_entry(path, name, entry, data_start) for name, entry in header.items()}
    _check_layout(path, tensors, data_start, file_size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, file_size=file_size)


def _bad(path: Path, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{path} is not a valid safetensors file: {why}")


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIMENSION for d in shape
    ):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _bad(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but its shape needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            why = "overlaps another tensor" if info.start < position else "leaves a gap before it"
            raise _bad(path, f"tensor {info.name!r} {why}")
        position = info.end
    if position != file_size:
        if position > file_size:
            raise _bad(path, f"tensor data ends at byte {position} but the file has {file_size} (truncated?)")
        raise _bad(path, f"{file_size - position} bytes after the last tensor")


# --- canonical writing ------------------------------------------------------------------------


def canonical_header(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) for tensors ``(name, dtype, shape)``, and each
    tensor's byte offset relative to the start of the data section. Names are sorted."""
    header: dict[str, object] = {"__metadata__": CANONICAL_METADATA}
    offsets: dict[str, int] = {}
    position = 0
    for name, dtype, shape in sorted(entries):
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw, offsets


class HashingWriter:
    """Writes to a binary file and hashes what it writes: the digest costs no second read."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self._hash = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")  # count bytes, not rows of a multi-dimensional buffer
        self._hash.update(view)
        self._file.write(view)
        self.bytes_written += view.nbytes

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# Per float dtype: its bits as an unsigned integer, and the mask that clears the sign. Without
# the sign, IEEE floats order like their bits (NaN above Inf above every finite value), so
# the largest magnitude is one integer max, with no float conversion (numpy has no bfloat16).
_MAGNITUDE_BITS = {"F16": ("<u2", 0x7FFF), "BF16": ("<u2", 0x7FFF), "F32": ("<u4", 0x7FFFFFFF),
                   "F64": ("<u8", 0x7FFFFFFFFFFFFFFF)}


def max_abs(dtype: str, chunk: bytes) -> float:
    """The largest magnitude in a chunk of little-endian floats of a FLOAT_DTYPES dtype:
    inf or nan when the chunk holds Inf or NaN, 0 when it is empty. Read without torch."""
    import numpy

    view, mask = _MAGNITUDE_BITS[dtype]
    bits = numpy.frombuffer(chunk, dtype=view)
    if not bits.size:
        return 0.0
    top = numpy.array([(bits & mask).max()], dtype=view)
    if dtype == "BF16":  # the top half of a float32
        return float((top.astype("<u4") << 16).view("<f4")[0])
    return float(top.view({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype])[0])


def _chunks(fd: int, header: SafetensorsHeader, info: TensorInfo) -> Iterable[bytes]:
    position = info.start
    while position < info.end:
        chunk = os.pread(fd, min(COPY_CHUNK, info.end - position), position)
        if not chunk:
            raise _bad(header.path, f"file shrank while reading tensor {info.name!r}")
        yield chunk
        position += len(chunk)


def copy_canonical(header: SafetensorsHeader, out: HashingWriter, allow_nonfinite: bool = False) -> dict[str, float]:
    """Write the canonical form of the file behind ``header`` to ``out``; refuse NaN or Inf
    values unless ``allow_nonfinite``. Returns each float tensor's largest magnitude, read
    on the way (the catalog records it to bound compositions before reading tensors)."""
    header_bytes, _ = canonical_header((t.name, t.dtype, t.shape) for t in header.tensors.values())
    out.write(header_bytes)
    maxima: dict[str, float] = {}
    with open(header.path, "rb") as src:
        for name in sorted(header.tensors):
            info = header.tensors[name]
            for chunk in _chunks(src.fileno(), header, info):
                if info.dtype in FLOAT_DTYPES:  # one pass finds both NaN or Inf and the maximum
                    largest = max_abs(info.dtype, chunk)
                    if not allow_nonfinite and not math.isfinite(largest):
                        raise InvalidAdapterError(
                            f"{header.path}: tensor {name!r} holds NaN or Inf values: fix the adapter, or pass "
                            "--allow-nonfinite to register it anyway"
                        )
                    maxima[name] = max(maxima.get(name, 0.0), largest, key=_nan_wins)
                out.write(chunk)
    return maxima


def tensor_maxima(header: SafetensorsHeader) -> tuple[dict[str, float], str]:
    """Each float tensor's largest magnitude, for a file stored before the catalog recorded
    it, and the sha256 of the whole file, read once from start to end (so that values read
    from a blob are checked against its digest)."""
    maxima: dict[str, float] = {}
    digest = hashlib.sha256()
    with open(header.path, "rb") as src:
        fd = src.fileno()
        position = 0
        for info in sorted(header.tensors.values(), key=lambda t: t.start):
            digest.update(os.pread(fd, info.start - position, position))  # the header, or a gap
            if info.dtype in FLOAT_DTYPES:
                maxima[info.name] = 0.0
            for chunk in _chunks(fd, header, info):
                digest.update(chunk)
                if info.dtype in FLOAT_DTYPES:
                    maxima[info.name] = max(maxima[info.name], max_abs(info.dtype, chunk), key=_nan_wins)
            position = info.end
        for chunk in iter(lambda: os.pread(fd, COPY_CHUNK, position), b""):
            digest.update(chunk)
            position += len(chunk)
    return maxima, digest.hexdigest()


def _nan_wins(value: float) -> float:
    """Sort key under which NaN is the largest value: a NaN anywhere makes the maximum NaN."""
    return math.inf if math.isnan(value) else value
