"""Evaluating a checked plan: stream the inputs layer by layer, write the output blob.

Each input's blob is read tensor by tensor with ``pread`` (not memory-mapped: touched
mapped pages count in the resident set, PERFORMANCE.md), so peak memory is about one layer
per input plus the output layer. The output is written in canonical form straight into the
blob store and hashed as it is written: its digest costs no second pass.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch

from registry import faults
from registry.adapters import adapter_type
from registry.compose.plan import OutputPlan
from registry.errors import BlobStoreError, IncompatibleModulesError
from registry.safetensors_io import FLOAT_DTYPES, SafetensorsHeader, TensorInfo, canonical_header, read_header
from registry.store import BlobStore

Progress = Callable[[int, int], None]


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return getattr(torch, FLOAT_DTYPES[safetensors_dtype])


def work_dtype(plan: OutputPlan) -> torch.dtype:
    """Arithmetic in float32 at least; float64 when the output or an input is float64."""
    wide = plan.dtype == "F64" or any(i.dtype == "F64" for i in plan.inputs)
    return torch.float64 if wide else torch.float32


class InputReader:
    """Reads one input blob's tensors on demand, checking them against the catalog."""

    def __init__(self, path: Path, digest: str, fd: int):
        self.header: SafetensorsHeader = read_header(path)
        self.digest = digest
        self.fd = fd

    def tensor(self, name: str, expected_shape: list[int]) -> torch.Tensor:
        info: TensorInfo | None = self.header.tensors.get(name)
        if info is None or list(info.shape) != list(expected_shape):
            raise BlobStoreError(
                f"blob sha256:{self.digest} does not match the catalog at {name}: run `pem verify --all`"
            )
        buffer = bytearray(info.nbytes)
        if info.nbytes and os.preadv(self.fd, [buffer], info.start) != info.nbytes:
            raise BlobStoreError(f"blob sha256:{self.digest} is truncated: run `pem verify --all`")
        return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).reshape(info.shape) if info.nbytes else (
            torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        )


def load_layer(reader: InputReader, layer_info: dict[str, Any], layer: str, suffixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of one layer of one input, keyed by parameter name (lora_A, ia3_l, ...)."""
    by_param = {param: suffix for suffix, param in suffixes.items()}
    return {
        param: reader.tensor(layer + by_param[param], shape) for param, shape in layer_info["params"].items()
    }


def open_readers(stack: ExitStack, plan: OutputPlan, store: BlobStore) -> list[InputReader]:
    readers = []
    for module in plan.inputs:
        path = store.local_path(module.digest)
        fd = os.open(path, os.O_RDONLY)
        stack.callback(os.close, fd)
        readers.append(InputReader(path, module.digest, fd))
    return readers


class LayerSource:
    """Loads one layer of every input at a time: None for an input that lacks the layer."""

    def __init__(self, plan: OutputPlan, store: BlobStore, stack: ExitStack):
        self.plan = plan
        self.suffixes = adapter_type(plan.peft_type).tensor_suffixes
        self.readers = open_readers(stack, plan, store)

    def load(self, layer: str) -> list[dict[str, torch.Tensor] | None]:
        return [
            load_layer(reader, module.layers[layer], layer, self.suffixes) if layer in module.layers else None
            for module, reader in zip(self.plan.inputs, self.readers)
        ]


def tensor_layers(plan: OutputPlan) -> dict[str, str]:
    """Output tensor name -> its layer (the longest layer name it extends)."""
    layers = set(plan.layers)
    mapping = {}
    for name in plan.tensors:
        layer = name
        while layer not in layers:
            if "." not in layer:
                raise AssertionError(f"output tensor {name} belongs to no planned layer")
            layer = layer.rpartition(".")[0]
        mapping[name] = layer
    return mapping


def _max_abs(tensor: torch.Tensor) -> float:
    """The largest magnitude; NaN or Inf anywhere shows in the minimum or the maximum: one
    reduction instead of a full boolean mask (about 20x cheaper on adapter-sized tensors)."""
    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor)
    return max(abs(low.item()), abs(high.item()))


class BackgroundWriter:
    """Hashes and writes output chunks in a second thread, in order, while the next layer is
    computed (sha256 and file writes release the GIL). The queue is short, so at most a few
    layers wait in memory; an error in the thread is raised by ``finish``."""

    DEPTH = 4

    def __init__(self, writer: Any):
        self._writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pem-blob-writer", daemon=True)

    def __enter__(self) -> "BackgroundWriter":
        self._thread.start()
        return self

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write(chunk)
                except BaseException as exc:  # re-raised in the caller's thread by finish()
                    self._error = exc

    def write(self, chunk: memoryview) -> None:
        if self._error is not None:
            self.finish()
        self._queue.put(chunk)

    def finish(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():  # leaving on an error: stop the thread, the blob is discarded
            self._queue.put(None)
            self._thread.join()


def evaluate(
    plan: OutputPlan, store: BlobStore, progress: Progress | None = None, output_store: BlobStore | None = None,
    magnitudes: dict[str, float] | None = None,
) -> tuple[str, int, dict[str, Any]]:
    """Compute the plan's output from the inputs in ``store`` into ``output_store`` (default:
    the same store). Returns (digest, size in bytes, results); fills ``magnitudes`` with each
    output tensor's largest |value|."""
    compute = adapter_type(plan.peft_type).compute()
    work = work_dtype(plan)
    out_dtype = torch_dtype(plan.dtype)
    layer_of = tensor_layers(plan)
    stats: dict[str, float] = {}
    header_bytes, _ = canonical_header((n, d, s) for n, (d, s) in plan.tensors.items())
    with ExitStack() as stack, (output_store or store).writer() as writer:
        # Element-wise work on adapter-sized tensors gains nothing from a second thread, and
        # loses much when the machine is busy; results do not depend on it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stack.callback(torch.set_num_threads, threads)
        writer.write(header_bytes)
        background = stack.enter_context(BackgroundWriter(writer))
        source = LayerSource(plan, store, stack)
        pending: dict[str, torch.Tensor] = {}
        done_layers = 0
        # The canonical file orders tensors by name; layers are computed as their first
        # tensor comes up and held until each of their tensors has been written.
        for name in sorted(plan.tensors):
            if name not in pending:
                layer = layer_of[name]
                outputs, layer_stats = compute.compute_layer(plan, layer, source.load(layer), work)
                for key, value in layer_stats.items():
                    stats[key] = stats.get(key, 0.0) + value
                pending.update(outputs)
                done_layers += 1
                if done_layers == 1:
                    faults.point("compose-layer")
                if progress is not None:
                    progress(done_layers, len(plan.layers))
            tensor = pending.pop(name).to(out_dtype).contiguous()
            if tuple(tensor.shape) != plan.tensors[name][1]:
                raise AssertionError(f"{name}: computed {tuple(tensor.shape)}, planned {plan.tensors[name][1]}")
            largest = _max_abs(tensor)
            if not math.isfinite(largest):
                raise IncompatibleModulesError(
                    [f"the result is not finite (NaN or Inf) at {name}: check the inputs and coefficients"]
                )
            if magnitudes is not None:
                magnitudes[name] = largest
            background.write(memoryview(tensor.view(torch.uint8).numpy()))
        background.finish()
        size = writer.sink.bytes_written
        digest = writer.commit()
    return digest, size, compute.finish(stats)


def measure_deviation(plan: OutputPlan, store: BlobStore) -> dict[str, Any]:
    """How far the ``module`` method's effect is from the exact sum, per layer and overall
    (relative Frobenius error of dW). LoRA only; reads the tensors, writes nothing."""
    from registry.adapters.lora.compute import deviation

    work = work_dtype(plan)
    per_layer: dict[str, float] = {}
    error_sq = norm_sq = 0.0
    with ExitStack() as stack:
        source = LayerSource(plan, store, stack)
        for layer in plan.layers:
            error, norm = deviation(plan, layer, source.load(layer), work)
            per_layer[layer] = error / norm if norm else 0.0
            error_sq += error**2
            norm_sq += norm**2
    return {"overall": (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0, "per_layer": per_layer}
