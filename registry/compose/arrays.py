"""The two array libraries the engine hands tensors to: numpy and torch.

The linear methods (``module``, ``exact`` and (IA)^3's arithmetic) are element-wise and run
on numpy, so that a composition with them never imports torch, whose import is most of a
short ``pem compose`` process (PERFORMANCE.md). Methods that need linear algebra (``svd``
and later ones) run on torch. A compute module says which it takes with ``ARRAYS``.

Both give the same bits: numpy has no bfloat16, so a BF16 tensor is a uint16 array of its
bits (no other integer array reaches the arithmetic), widened to float32 by shifting the
bits (exact) when a kernel computes with it (:func:`widen`) and narrowed back with
round-to-nearest-even on the bits, as torch does; a BF16 tensor copied as it is (``exact``'s
B factors) is never converted. 16-bit outputs of float64 arithmetic are narrowed through
float32, as torch's casts do. tests/test_compose_arrays.py checks every dtype pair against
torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy

from registry.safetensors_io import FLOAT_DTYPES

# How each safetensors float dtype is stored, as numpy sees the bytes.
_STORAGE = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.uint16}


class NumpyArrays:
    name = "numpy"

    @staticmethod
    def work_dtype(wide: bool) -> Any:
        return numpy.float64 if wide else numpy.float32

    @staticmethod
    def decode(buffer: bytearray, dtype: str, shape: tuple[int, ...]) -> numpy.ndarray:
        """A little-endian tensor as stored, without a copy (BF16: a uint16 array of its bits)."""
        return numpy.frombuffer(buffer, dtype=_STORAGE[dtype]).reshape(shape)

    @staticmethod
    def encode(array: numpy.ndarray, dtype: str) -> memoryview:
        """The bytes of ``array`` cast to ``dtype`` (round to nearest, ties to even)."""
        if array.dtype == numpy.uint16:  # bfloat16 bits
            if dtype == "BF16":
                return memoryview(numpy.ascontiguousarray(array)).cast("B")
            array = widen(array, numpy.float32)
        if dtype == "F64":
            out = array.astype(numpy.float64, copy=False)
        elif dtype == "F32":
            out = array.astype(numpy.float32, copy=False)
        else:
            single = array.astype(numpy.float32, copy=False)  # torch narrows float64 through float32
            out = single.astype(numpy.float16) if dtype == "F16" else _round_to_bfloat16(single)
        return memoryview(numpy.ascontiguousarray(out)).cast("B")

    @staticmethod
    def shape(array: numpy.ndarray) -> tuple[int, ...]:
        return tuple(array.shape)

    @staticmethod
    def pin_threads() -> Any:
        return None


def largest_magnitude(encoded: memoryview, dtype: str) -> float:
    """The largest |value| of a tensor's stored bytes; NaN or Inf shows in the minimum or the
    maximum (two reductions, no mask), and then the result is not finite."""
    values = numpy.frombuffer(encoded, dtype=_STORAGE[dtype])
    if values.size == 0:
        return 0.0
    if dtype == "BF16":
        values = widen(values, numpy.float32)
    low, high = float(values.min()), float(values.max())
    return max(abs(low), abs(high)) if low == low and high == high else math.nan


def widen(array: numpy.ndarray, work: Any) -> numpy.ndarray:
    """The values of ``array`` in the working dtype (exact: work is float32 or wider). The
    result may be ``array`` itself (read-only when it was read from a blob)."""
    if array.dtype == numpy.uint16:  # bfloat16 bits: the high half of a float32
        single = numpy.left_shift(array, 16, dtype=numpy.uint32).view(numpy.float32)
        return single if work is numpy.float32 else single.astype(work)
    return array.astype(work, copy=False)


def scaled(array: numpy.ndarray, coefficient: float, work: Any) -> numpy.ndarray:
    """array * coefficient in the working dtype, a new array (the coefficient rounded to the
    working dtype first, as torch does with a Python scalar)."""
    values = widen(array, work)
    if values is array:
        return numpy.multiply(values, work(coefficient))
    values *= work(coefficient)
    return values


def _round_to_bfloat16(single: numpy.ndarray) -> numpy.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even: add 0x7FFF plus the lowest kept
    bit, keep the high half (NaN is never written: the engine refuses non-finite outputs)."""
    bits = single.view(numpy.uint32)
    rounded = numpy.right_shift(bits, 16)
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    out = numpy.empty(bits.shape, dtype=numpy.uint16)
    return numpy.right_shift(rounded, 16, out=out, casting="unsafe")  # shift and narrow in one pass


class TorchArrays:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def work_dtype(self, wide: bool) -> Any:
        return self.torch.float64 if wide else self.torch.float32

    def _dtype(self, dtype: str) -> Any:
        return getattr(self.torch, FLOAT_DTYPES[dtype])

    def decode(self, buffer: bytearray, dtype: str, shape: tuple[int, ...]) -> Any:
        if not buffer:
            return self.torch.empty(shape, dtype=self._dtype(dtype))
        return self.torch.frombuffer(buffer, dtype=self._dtype(dtype)).reshape(shape)

    def encode(self, tensor: Any, dtype: str) -> memoryview:
        out = tensor.to(self._dtype(dtype)).contiguous()
        return memoryview(out.view(self.torch.uint8).numpy()).cast("B")

    @staticmethod
    def shape(tensor: Any) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def pin_threads(self) -> Any:
        """Element-wise work on adapter-sized tensors gains nothing from a second thread, and
        loses much when the machine is busy; results do not depend on it. Returns the undo."""
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        return lambda: self.torch.set_num_threads(threads)


def arrays_for(compute: Any) -> Any:
    return NumpyArrays() if getattr(compute, "ARRAYS", "torch") == "numpy" else TorchArrays()
