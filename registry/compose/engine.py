"""Evaluating a checked plan: stream the inputs layer by layer, write the output blob.

Inputs are read with ``pread``, one read per layer and input (a layer's tensors lie next to
each other in a canonical blob), not memory-mapped: touched mapped pages count in the
resident set (PERFORMANCE.md), so peak memory is about a few layers per input plus the output
layer. A reader thread reads the next layers while the current one is computed, and hashes
every input as it reads it (sha256 releases the GIL), so checking each input against its
digest costs no second pass; the output is hashed as it is written. The output blob becomes
visible only once every input's digest has matched: a corrupt input registers nothing.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from contextlib import ExitStack
from typing import Any, Callable, Iterator

from registry import faults
from registry.adapters import adapter_type
from registry.compose.arrays import arrays_for, largest_magnitude
from registry.compose.plan import InputModule, OutputPlan
from registry.errors import BlobStoreError, IncompatibleModulesError, InvalidAdapterError
from registry.safetensors_io import SafetensorsHeader, canonical_header, read_header
from registry.store import BlobStore
from registry.store.checked import DigestCheck, open_blob

Progress = Callable[[int, int], None]
# A layer of one input as read: parameter name (lora_A, ia3_l, ...) -> (dtype, shape, bytes).
RawLayer = dict[str, tuple[str, tuple[int, ...], bytearray]]


def is_wide(plan: OutputPlan) -> bool:
    """Arithmetic in float32 at least; float64 when the output or an input is float64."""
    return plan.dtype == "F64" or any(i.dtype == "F64" for i in plan.inputs)


def tensor_layers(plan: OutputPlan) -> dict[str, str]:
    """Output tensor name -> its layer (the longest layer name it extends), in name order."""
    layers = set(plan.layers)
    mapping = {}
    for name in sorted(plan.tensors):
        layer = name
        while layer not in layers:
            if "." not in layer:
                raise AssertionError(f"output tensor {name} belongs to no planned layer")
            layer = layer.rpartition(".")[0]
        mapping[name] = layer
    return mapping


def layer_order(layer_of: dict[str, str]) -> list[str]:
    """Layers in the order the canonical output needs them: the order of their first tensor
    by name. Inputs are canonical files too, so this reads each input front to back."""
    return list(dict.fromkeys(layer_of.values()))


class InputBlob:
    """One input's blob, open: its header checked against the catalog, its digest checked
    from the bytes read."""

    def __init__(self, module: InputModule, store: BlobStore, stack: ExitStack):
        self.module = module
        try:
            path, self.fd = open_blob(store, module.digest)
        except BlobStoreError:
            raise BlobStoreError(
                f"blob of {module.ref} (sha256:{module.digest}) is missing from {store.location}: "
                "run `pem verify --all`"
            ) from None
        stack.callback(os.close, self.fd)
        self.check = DigestCheck(store, module.ref, module.digest, self.fd, module.size_bytes)
        self.check.check_size()
        try:
            self.header: SafetensorsHeader = read_header(path)
        except InvalidAdapterError:
            raise self.check.corrupt("its header is not a valid safetensors header") from None

    def read_layer(self, layer: str, suffixes: dict[str, str]) -> RawLayer:
        """The layer's tensors in one read (they are contiguous), fed to the digest check."""
        by_param = {param: suffix for suffix, param in suffixes.items()}
        infos = []
        for param, shape in self.module.layers[layer]["params"].items():
            info = self.header.tensors.get(layer + by_param[param])
            if info is None or list(info.shape) != list(shape):
                raise self.check.corrupt(f"it does not hold {layer + by_param[param]} as the catalog records")
            infos.append((param, info))
        infos.sort(key=lambda item: item[1].start)
        out: RawLayer = {}
        run: list[tuple[str, Any]] = []
        for param, info in infos + [("", None)]:
            if run and (info is None or info.start != run[-1][1].end):
                self._read_run(run, out)
                run = []
            if info is not None:
                run.append((param, info))
        return out

    def _read_run(self, run: list[tuple[str, Any]], out: RawLayer) -> None:
        buffers = [bytearray(info.nbytes) for _, info in run]
        start, total = run[0][1].start, sum(len(b) for b in buffers)
        if total and os.preadv(self.fd, buffers, start) != total:
            raise self.check.corrupt("truncated while reading it")
        for (param, info), buffer in zip(run, buffers):
            self.check.feed(info.start, buffer)
            out[param] = (info.dtype, info.shape, buffer)


class LayerReader:
    """Reads layers of every input in a background thread, a few layers ahead of the
    arithmetic: ``None`` for an input that lacks a layer. After the last layer, the thread
    hashes what was not read (nothing, for canonical inputs) and ``verify`` compares every
    input with its digest."""

    AHEAD = 3

    def __init__(self, plan: OutputPlan, store: BlobStore, stack: ExitStack, order: list[str]):
        self.inputs = [InputBlob(module, store, stack) for module in plan.inputs]
        self.suffixes = adapter_type(plan.peft_type).tensor_suffixes
        self._order = order
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pem-input-reader", daemon=True)
        self._thread.start()
        stack.callback(self.close)

    def _run(self) -> None:
        try:
            for layer in self._order:
                loaded = [
                    blob.read_layer(layer, self.suffixes) if layer in blob.module.layers else None
                    for blob in self.inputs
                ]
                if not self._put((layer, loaded)):
                    return
            for blob in self.inputs:
                blob.check.hash_rest()
            self._put(None)
        except BaseException as exc:  # handed to the consumer, raised in its thread
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def layers(self) -> Iterator[tuple[str, list[RawLayer | None]]]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item

    def verify(self) -> None:
        """Raise CorruptBlobError for the first input whose bytes do not match its digest."""
        for blob in self.inputs:
            blob.check.verify()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def decoded(arrays: Any, raw: list[RawLayer | None]) -> list[dict[str, Any] | None]:
    return [
        None if layer is None else {param: arrays.decode(buffer, dtype, shape) for param, (dtype, shape, buffer) in layer.items()}
        for layer in raw
    ]


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
    output tensor's largest |value| as stored. Raises CorruptBlobError, with nothing stored,
    when an input does not match its digest."""
    compute = adapter_type(plan.peft_type).compute(plan.method.name)
    arrays = arrays_for(compute)
    work = arrays.work_dtype(is_wide(plan))
    layer_of = tensor_layers(plan)
    order = layer_order(layer_of)
    stats: dict[str, float] = {}
    header_bytes, _ = canonical_header((n, d, s) for n, (d, s) in plan.tensors.items())
    with ExitStack() as stack, (output_store or store).writer() as writer:
        undo = arrays.pin_threads()
        if undo is not None:
            stack.callback(undo)
        writer.write(header_bytes)
        background = stack.enter_context(BackgroundWriter(writer))
        reader = LayerReader(plan, store, stack, order)
        layers = reader.layers()
        pending: dict[str, Any] = {}
        done = 0
        # The canonical file orders tensors by name; layers are computed as their first
        # tensor comes up and held until each of their tensors has been written.
        for name, layer in layer_of.items():
            if name not in pending:
                read_layer, raw = next(layers)
                assert read_layer == layer, (read_layer, layer)
                outputs, layer_stats = compute.compute_layer(plan, layer, decoded(arrays, raw), work)
                for key, value in layer_stats.items():
                    stats[key] = stats.get(key, 0.0) + value
                pending.update(outputs)
                done += 1
                if done == 1:
                    faults.point("compose-layer")
                if progress is not None:
                    progress(done, len(order))
            array = pending.pop(name)
            if arrays.shape(array) != plan.tensors[name][1]:
                raise AssertionError(f"{name}: computed {arrays.shape(array)}, planned {plan.tensors[name][1]}")
            encoded = arrays.encode(array, plan.tensors[name][0])
            largest = largest_magnitude(encoded, plan.tensors[name][0])  # as stored: a value may overflow only there
            if not math.isfinite(largest):
                raise IncompatibleModulesError(
                    [f"the result is not finite (NaN or Inf) at {name}: check the inputs and coefficients"]
                )
            if magnitudes is not None:
                magnitudes[name] = largest
            background.write(encoded)
        for _ in layers:  # the reader's end: every input hashed to its end
            raise AssertionError("the reader read more layers than planned")
        background.finish()
        reader.verify()  # before the output becomes visible
        size = writer.sink.bytes_written
        digest = writer.commit()
    return digest, size, compute.finish(stats)


def measure_deviation(plan: OutputPlan, store: BlobStore) -> dict[str, Any]:
    """How far the method's effect is from the exact sum, per layer and overall
    (relative Frobenius error of dW). LoRA only; reads the tensors, writes nothing."""
    from registry.adapters.lora.compute import deviation
    from registry.compose.arrays import TorchArrays

    arrays = TorchArrays()
    work = arrays.work_dtype(is_wide(plan))
    per_layer: dict[str, float] = {}
    error_sq = norm_sq = 0.0
    with ExitStack() as stack:
        reader = LayerReader(plan, store, stack, layer_order(tensor_layers(plan)))
        for layer, raw in reader.layers():
            error, norm = deviation(plan, layer, decoded(arrays, raw), work)
            per_layer[layer] = error / norm if norm else 0.0
            error_sq += error**2
            norm_sq += norm**2
        reader.verify()
    return {"overall": (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0, "per_layer": per_layer}
