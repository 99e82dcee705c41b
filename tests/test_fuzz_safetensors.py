"""Fuzzing the safetensors reader (issue 8): whatever bytes a file holds, ``read_header``
either returns a header that is valid by the format's rules (checked here independently) or
raises :class:`InvalidAdapterError`; never another exception, never a hang. An accepted
header always copies to a canonical file that reads back with the same tensors.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from registry.errors import InvalidAdapterError
from registry.safetensors_io import DTYPE_SIZES, HashingWriter, copy_canonical, read_header

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
SECONDS = 2.0  # far more than a header ever needs

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
dtypes = st.one_of(
    st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["F7", "", "f32", "F32 ", "I128"]), json_values,
)
dims = st.one_of(st.integers(0, 5), st.integers(-3, 2**40), st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64]))
shapes = st.one_of(st.lists(dims, max_size=4), st.lists(st.integers(0, 4), min_size=9, max_size=10), json_values)


@st.composite
def near_valid_files(draw) -> bytes:
    """Files that are mostly well-formed, with a few fields perturbed."""
    header: dict[str, object] = {}
    position = 0
    for index in range(draw(st.integers(0, 4))):
        dtype = draw(dtypes)
        shape = draw(shapes)
        if isinstance(dtype, str) and dtype in DTYPE_SIZES and isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 64 for d in shape
        ):
            size = math.prod(shape) * DTYPE_SIZES[dtype]
        else:
            size = draw(st.integers(0, 64))
        offsets: object = [position, position + size]
        perturb = draw(st.sampled_from(["none", "none", "none", "shift", "stretch", "random", "json"]))
        if perturb == "shift":
            delta = draw(st.integers(-8, 8))
            offsets = [position + delta, position + size + delta]
        elif perturb == "stretch":
            offsets = [position, position + size + draw(st.integers(-8, 8))]
        elif perturb == "random":
            offsets = draw(st.lists(st.integers(-(2**64), 2**64), max_size=3))
        elif perturb == "json":
            offsets = draw(json_values)
        name = draw(st.one_of(st.just(f"t{index}"), st.text(max_size=6)))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()) and isinstance(header[name], dict):
            header[name] = draw(st.one_of(json_values, st.just(header[name])))
        position += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                                                json_values))
    raw = json.dumps(header).encode()
    if draw(st.booleans()):
        raw += b" " * draw(st.integers(0, 7))
    data_length = position + draw(st.sampled_from([0, 0, 0, 1, -1, 7, -7]))
    data = draw(st.binary(min_size=max(0, data_length), max_size=max(0, data_length)))
    length = len(raw)
    choice = draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "huge"]))
    if choice == "short":
        length = max(0, length - draw(st.integers(1, 8)))
    elif choice == "long":
        length += draw(st.integers(1, 64))
    elif choice == "huge":
        length = draw(st.integers(2**27, 2**64 - 1))
    return length.to_bytes(8, "little") + raw + data


@st.composite
def json_texts(draw) -> bytes:
    """A length prefix that matches, then arbitrary JSON-ish text, then arbitrary data."""
    pieces = draw(st.lists(st.one_of(
        st.sampled_from(['{', '}', '[', ']', ',', ':', '"dtype"', '"shape"', '"data_offsets"', '"F32"', '"t"',
                         '"__metadata__"', '0', '1', '-1', 'null', 'true', 'NaN', 'Infinity', '1e999', '"\\ud800"']),
        st.text(max_size=4),
        st.integers(0, 6000).map(lambda n: "9" * n),           # integers longer than int() accepts
        st.integers(0, 200_000).map(lambda n: "[" * n + "]" * n),  # nesting deeper than the decoder's stack
    ), max_size=12))
    raw = "".join(pieces).encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + draw(st.binary(max_size=32))


def check(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    started = time.monotonic()
    try:
        header = read_header(path)
    except InvalidAdapterError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 2000
        return
    finally:
        assert time.monotonic() - started < SECONDS
    _assert_valid(header, content)


def _assert_valid(header, content: bytes) -> None:
    """The format's rules, checked again here, and a canonical copy that reads back."""
    length = int.from_bytes(content[:8], "little")
    data_start = 8 + length
    assert data_start <= len(content) == header.file_size
    position = data_start
    for info in sorted(header.tensors.values(), key=lambda t: (t.start, t.end)):
        assert info.dtype in DTYPE_SIZES
        assert all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert info.end - info.start == math.prod(info.shape) * DTYPE_SIZES[info.dtype]
        assert info.start == position
        position = info.end
    assert position == len(content)
    raw = json.loads(content[8:data_start])
    assert set(header.tensors) == set(raw) - {"__metadata__"}

    out = io.BytesIO()
    copy_canonical(header, HashingWriter(out), allow_nonfinite=True)
    canonical_path = header.path.with_suffix(".canonical")
    canonical_path.write_bytes(out.getvalue())
    again = read_header(canonical_path)
    assert {n: (t.dtype, t.shape) for n, t in again.tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in header.tensors.items()
    }
    copied = out.getvalue()
    for name, info in header.tensors.items():
        twin = again.tensors[name]
        assert copied[twin.start:twin.end] == content[info.start:info.end]


@FUZZ
@given(near_valid_files())
@example(b"\x00" * 8)
@example((2**60).to_bytes(8, "little") + b"{}")
def test_near_valid_files_are_accepted_only_when_valid(tmp_path: Path, content: bytes) -> None:
    check(tmp_path / "fuzz.safetensors", content)


@FUZZ
@given(json_texts())
# known hostile headers, always run: nesting deeper than the JSON decoder's recursion limit,
# an integer literal longer than Python converts, a dtype that is not hashable
@example(len(b"[" * 100_000 + b"]" * 100_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000)
@example(len(b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"1" * 5000 + b"]}}").to_bytes(8, "little")
         + b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"1" * 5000 + b"]}}")
@example(len(b'{"t":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}').to_bytes(8, "little")
         + b'{"t":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}' + b"\x00" * 4)
def test_json_like_headers_raise_only_invalid_adapter_errors(tmp_path: Path, content: bytes) -> None:
    check(tmp_path / "fuzz.safetensors", content)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_invalid_adapter_errors(tmp_path: Path, content: bytes) -> None:
    check(tmp_path / "fuzz.safetensors", content)


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x00" * 7])
def test_files_shorter_than_the_length_prefix_are_invalid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidAdapterError, match="shorter than a safetensors header"):
        read_header(path)
