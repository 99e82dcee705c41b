"""The linear methods computed with numpy give the bits torch gives.

``module`` and ``exact`` (LoRA) and (IA)^3's arithmetic run on numpy so that a composition
never imports torch; modules composed before that were computed with torch, and ``pem
verify`` re-derives them by digest. So the numpy path must give exactly torch's bytes: here
torch is the second implementation, fed the same layers, for every dtype the engine accepts
and every output dtype, including rounding ties, subnormals and float64 narrowed to 16 bits.
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy
import pytest
import torch

from registry.compose.arrays import NumpyArrays, TorchArrays, widen

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def torch_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def raw(tensor: torch.Tensor) -> bytearray:
    return bytearray(torch_bytes(tensor))


# --- casting alone -------------------------------------------------------------------------------


def special_floats() -> torch.Tensor:
    """float32 values whose narrowing is delicate: exact ties for bfloat16 (low half 0x8000,
    with even and odd kept bits), just below and above them, subnormals, the largest finite
    values, signed zeros."""
    bits = []
    for high in (0x3F80, 0x3F81, 0x0001, 0x0080, 0x7F7E, 0xBF80, 0xBF81, 0x4049):
        for low in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            bits.append((high << 16) | low)
    values = numpy.array(bits, dtype=numpy.uint32).view(numpy.float32)
    extra = numpy.array([0.0, -0.0, 65504.0, 65519.99, 6.1e-5, 5.96e-8, 2.98e-8, 1e-40, -1e-40, 3.0e38], numpy.float32)
    return torch.from_numpy(numpy.concatenate([values, extra]))


@pytest.mark.parametrize("source", ["F32", "F64"])
@pytest.mark.parametrize("target", ["F64", "F32", "F16", "BF16"])
def test_encode_matches_torch_casts(source: str, target: str) -> None:
    values = special_floats().to(DTYPES[source])
    if source == "F64":
        # Just above a 16-bit tie, by less than float32 resolves: narrowing straight to 16 bits
        # rounds up, through float32 (as torch does) it ties and rounds to even.
        near_ties = torch.tensor([1 + 2.0**-11 + 2.0**-40, 1 + 2.0**-8 + 2.0**-40, -(1 + 2.0**-8 + 2.0**-41)],
                                 dtype=torch.float64)
        values = torch.cat([values, values * (1 + 2.0**-30), values * (1 - 2.0**-30), near_ties])
    expected = values.to(DTYPES[target])
    finite = torch.isfinite(expected.to(torch.float64))  # non-finite outputs are refused, never written
    values, expected = values[finite], expected[finite]
    got = bytes(NumpyArrays.encode(values.numpy(), target))
    assert got == torch_bytes(expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decode_gives_the_stored_values(dtype: str) -> None:
    tensor = (torch.randn(7, 5, generator=torch.Generator().manual_seed(1)) * 3).to(DTYPES[dtype])
    decoded = widen(NumpyArrays.decode(raw(tensor), dtype, (7, 5)), numpy.float64)
    assert numpy.array_equal(decoded, tensor.to(torch.float64).numpy())


# --- whole layers --------------------------------------------------------------------------------


def lora_plan(method: str, coefficients: list[tuple[Fraction, Fraction]], scalings: list[float]) -> SimpleNamespace:
    inputs = [
        SimpleNamespace(a=a, b=b, layers={"l": {"scaling": s}}) for (a, b), s in zip(coefficients, scalings)
    ]
    return SimpleNamespace(inputs=inputs, method=SimpleNamespace(name=method))


COEFFICIENTS = [(Fraction(1, 3), Fraction(1, 3)), (Fraction(7, 10), Fraction(-7, 10)), (Fraction(2), Fraction(2))]
SCALINGS = [2.0, 0.7071067811865476, 16.0 / 3.0]


@pytest.mark.parametrize("method", ["module", "exact"])
@pytest.mark.parametrize("dtypes,out", [
    (("BF16", "BF16", "BF16"), "BF16"),
    (("F16", "F16", "F16"), "F16"),
    (("F32", "F32", "F32"), "F32"),
    (("BF16", "F16", "F32"), "F32"),
    (("BF16", "F16", "F32"), "BF16"),
    (("F64", "BF16", "F16"), "F64"),
    (("F64", "F32", "BF16"), "BF16"),
    (("F64", "F32", "F16"), "F16"),
    (("F16", "F16", "F16"), "BF16"),
])
def test_lora_linear_methods_give_torchs_bytes(method: str, dtypes: tuple[str, ...], out: str) -> None:
    from registry.adapters.lora import compute as torch_compute
    from registry.adapters.lora import linear as numpy_compute

    generator = torch.Generator().manual_seed(hash((method, dtypes, out)) % 2**31)
    layers = [
        {"lora_A": (torch.randn(4, 24, generator=generator) * 0.4).to(DTYPES[d]),
         "lora_B": (torch.randn(40, 4, generator=generator) * 0.05).to(DTYPES[d])}
        for d in dtypes
    ]
    plan = lora_plan(method, COEFFICIENTS, SCALINGS)
    wide = out == "F64" or "F64" in dtypes
    torch_arrays = TorchArrays()
    expected, _ = torch_compute.compute_layer(plan, "l", layers, torch_arrays.work_dtype(wide))
    loaded = [
        {param: NumpyArrays.decode(raw(t), d, tuple(t.shape)) for param, t in layer.items()}
        for layer, d in zip(layers, dtypes)
    ]
    got, _ = numpy_compute.compute_layer(plan, "l", loaded, NumpyArrays.work_dtype(wide))
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert bytes(NumpyArrays.encode(got[name], out)) == bytes(torch_arrays.encode(expected[name], out)), name


@pytest.mark.parametrize("dtype,out", [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("F64", "F32"), ("BF16", "F32")])
def test_ia3_arithmetic_gives_the_torch_forms_bytes(dtype: str, out: str) -> None:
    """The (IA)^3 formula as it was computed with torch: ((l - 1.0) * b) summed in order, + 1.0."""
    from registry.adapters.ia3 import compute

    generator = torch.Generator().manual_seed(5)
    vectors = [(1 + torch.randn(33, generator=generator) * 0.2).to(DTYPES[dtype]) for _ in range(3)]
    coefficients = [0.5, -0.3, 1.0 / 3.0]
    wide = dtype == "F64" or out == "F64"
    work = torch.float64 if wide else torch.float32
    offset = None
    for vector, b in zip(vectors, coefficients):
        term = (vector.to(work) - 1.0) * b
        offset = term if offset is None else offset + term
    expected = (offset + 1.0).to(DTYPES[out])

    plan = SimpleNamespace(inputs=[SimpleNamespace(b=Fraction(b)) for b in coefficients])
    loaded = [{"ia3_l": NumpyArrays.decode(raw(v), dtype, (33,))} for v in vectors]
    got, _ = compute.compute_layer(plan, "l", loaded, NumpyArrays.work_dtype(wide))
    assert bytes(NumpyArrays.encode(got["l.ia3_l"], out)) == torch_bytes(expected)
