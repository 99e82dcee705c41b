"""One measured step of bench/compose.py, run in its own process.

    python bench/_compose_worker.py '{"kind": "registry", ...}'

Prints one JSON line on stdout (the last line). Times are taken inside the process with
``time.perf_counter``: ``imports_s`` from the first line of this file to the end of the
imports the step needs (the interpreter's own start-up is not in it: the parent measures the
whole process), ``step_s`` the step itself. Memory, from /proc and getrusage:

- ``baseline_mb``: resident set right before the step (interpreter, imports, open files);
- ``step_peak_mb``: the highest resident set during the step. The kernel's high-water mark is
  reset just before the step (``/proc/self/clear_refs`` = 5), so this is the step's own peak,
  baseline included; ``peak_reset`` says whether the reset worked (if not, it is the
  process-lifetime peak);
- ``process_peak_mb``: the process-lifetime peak (max of the mark before the reset and after).

Only the standard library is imported at the top: each kind imports what it needs, so the
baseline is what that route really loads.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# --- the adapters' shapes (a 7B-class Llama decoder) --------------------------------------------

HIDDEN = 4096
INTERMEDIATE = 11008
RANK = 16
ALPHA = 32
BASE_MODEL = "bench/llama-7b-shape"
# module path inside a decoder layer -> (in_features, out_features)
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
TARGET_MODULES = sorted(p.rpartition(".")[2] for p in PROJECTIONS)


def adapter_config() -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": BASE_MODEL,
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": TARGET_MODULES,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def tensor_specs(layers: int):
    """(name, shape) of every tensor of one adapter, in a fixed order."""
    for i in range(layers):
        for proj, (fan_in, fan_out) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{i}.{proj}"
            yield f"{prefix}.lora_A.weight", (RANK, fan_in)
            yield f"{prefix}.lora_B.weight", (fan_out, RANK)


# --- measuring ----------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Measure:
    """Wraps the step: baseline before, wall time and peak of the step, lifetime peak."""

    def __init__(self, profile: str | None = None):
        self.profile = profile
        self.result: dict = {}

    def __enter__(self) -> "Measure":
        self.result["imports_s"] = time.perf_counter() - T0
        self.lifetime_peak_before = max_rss_mb()
        self.result["baseline_mb"] = rss_mb()
        self.result["peak_reset"] = reset_peak()
        self.profiler = None
        if self.profile:
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()
        self.usage = resource.getrusage(resource.RUSAGE_SELF)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.result["step_s"] = time.perf_counter() - self.start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.result["step_cpu_s"] = usage.ru_utime + usage.ru_stime - self.usage.ru_utime - self.usage.ru_stime
        self.result["step_sys_s"] = usage.ru_stime - self.usage.ru_stime
        self.result["step_minor_faults"] = usage.ru_minflt - self.usage.ru_minflt
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(self.profile)
        peak = max_rss_mb()
        self.result["step_peak_mb"] = peak
        self.result["process_peak_mb"] = max(peak, self.lifetime_peak_before)
        self.result["end_rss_mb"] = rss_mb()


# --- setup: generate, register, warm ------------------------------------------------------------


def setup(spec: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    from registry import Registry

    workdir = Path(spec["workdir"])
    layers, seed, count = spec["layers"], spec["seed"], spec["count"]
    stamp = {"layers": layers, "seed": seed, "count": count, "rank": RANK}
    stamp_file = workdir / "setup.json"
    if stamp_file.exists():
        previous = json.loads(stamp_file.read_text())
        if previous.get("stamp") == stamp:  # a kept workdir with the same adapters: reuse it
            previous["reused"] = True
            # upgrade the kept catalog to this version's schema
            Registry.init(previous["home"], database_url=f"sqlite:///{previous['database']}",
                          store=previous["store"]).close()
            warm(previous["blobs"] + [f for a in previous["adapters"] for f in adapter_files(Path(a))])
            return previous

    start = time.perf_counter()
    adapters = []
    for index in range(count):
        folder = workdir / "adapters" / f"lora-{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        tensors = {}
        for name, shape in tensor_specs(layers):
            # one tensor at a time, float32 only for that tensor: A like PEFT's init, B "trained"
            std = (1.0 / shape[1]) ** 0.5 if ".lora_A." in name else 0.02
            tensors[name] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        del tensors
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config(), indent=2))
        adapters.append(str(folder))
    generated_s = time.perf_counter() - start

    start = time.perf_counter()
    home = workdir / "registry"
    registry = Registry.init(home, database_url=f"sqlite:///{home / 'registry.db'}", store=str(home / "blobs"))
    refs, blobs = [], []
    for index, folder in enumerate(adapters):
        info = registry.add(folder, f"bench/lora-{index:02d}", task="bench")
        refs.append(info.ref)
        blobs.append(str(registry.store.local_path(info.digest)))
    registry.close()
    registered_s = time.perf_counter() - start

    result = {
        "stamp": stamp,
        "adapters": adapters,
        "refs": refs,
        "blobs": blobs,
        "home": str(home),
        "database": str(home / "registry.db"),
        "store": str(home / "blobs"),
        "adapter_bytes": [os.path.getsize(Path(a) / "adapter_model.safetensors") for a in adapters],
        "blob_bytes": [os.path.getsize(b) for b in blobs],
        "generated_s": generated_s,
        "registered_s": registered_s,
        "reused": False,
    }
    stamp_file.write_text(json.dumps(result))
    warm(blobs + [f for a in adapters for f in adapter_files(Path(a))])
    return result


def adapter_files(folder: Path) -> list[str]:
    return [str(folder / "adapter_model.safetensors"), str(folder / "adapter_config.json")]


def warm(paths: list[str]) -> None:
    """Read each file once, so that every route starts with the page cache warm."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


# --- the registry: Registry.compose through the Python API -----------------------------------


def run_registry(spec: dict) -> dict:
    from registry import Registry

    Registry  # noqa: B018  (resolves the lazy attribute: imports registry.api)
    # The engine (and the array library of the method) are imported by compose on first use;
    # import them here so that the step, like the naive script's, excludes imports (the whole
    # `pem compose` process, the "pem" route, includes them).
    import registry.compose.engine  # noqa: F401
    from registry.adapters import adapter_type

    adapter_type("LORA").compute(spec["method"])

    measure = Measure(spec.get("profile"))
    opened = time.perf_counter()
    registry = Registry.open(spec["home"], database_url=f"sqlite:///{spec['database']}", store=spec["store"])
    open_s = time.perf_counter() - opened
    with measure:
        info = registry.compose(spec["expression"], spec["name"], method=spec["method"])
    registry.close()
    assert info.created, "the registry reused an earlier derivation: the step computed nothing"
    return {**measure.result, "open_s": open_s, "digest": info.digest, "output_bytes": info.size_bytes}


# --- the naive script: load_file everything, torch arithmetic, save_file ------------------------


def run_naive(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(spec["output"])
    measure = Measure(spec.get("profile"))
    with measure:
        inputs = [load_file(os.path.join(folder, "adapter_model.safetensors")) for folder in spec["inputs"]]
        configs = [json.loads(Path(folder, "adapter_config.json").read_text()) for folder in spec["inputs"]]
        scalings = [c["lora_alpha"] / c["r"] for c in configs]
        a_coef, b_coef = spec["a"], spec["b"]
        result = {}
        for name in inputs[0]:
            if not name.endswith(".lora_A.weight"):
                continue
            b_name = name.replace(".lora_A.", ".lora_B.")
            if spec["method"] == "module":  # A = sum a_i A_i, B = sum b_i s_i B_i
                a_sum = sum(t[name].float() * a for t, a in zip(inputs, a_coef))
                b_sum = sum(t[b_name].float() * (b * s) for t, b, s in zip(inputs, b_coef, scalings))
            else:  # exact: A = cat_rows(b_i s_i A_i), B = cat_cols(B_i)
                a_sum = torch.cat([t[name].float() * (b * s) for t, b, s in zip(inputs, b_coef, scalings)], dim=0)
                b_sum = torch.cat([t[b_name].float() for t in inputs], dim=1)
            result[name] = a_sum.to(torch.bfloat16)
            result[b_name] = b_sum.to(torch.bfloat16)
        out.mkdir(parents=True, exist_ok=True)
        save_file(result, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        rank = configs[0]["r"] * (len(inputs) if spec["method"] == "exact" else 1)
        config = {**configs[0], "r": rank, "lora_alpha": rank}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return {**measure.result, "output_bytes": os.path.getsize(out / "adapter_model.safetensors")}


# --- PEFT: base model, PeftModel.from_pretrained, add_weighted_adapter("cat"), save_pretrained --


def run_peft(spec: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = spec["layers"]
    measure = Measure(spec.get("profile"))
    phases = {}
    with measure:
        mark = time.perf_counter()

        def phase(label: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[label] = now - mark
            mark = now

        config = LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        )
        # The module tree of a Llama-7B-shaped model with its bf16 parameters allocated...
        with torch.device("meta"):
            base = LlamaForCausalLM(config).to(torch.bfloat16)
        base = base.to_empty(device="cpu")
        phase("base_alloc_s")
        # ... and materialised: zero-filled, standing in for loading the weights (a real
        # from_pretrained reads ~13.5 GB on top of touching the same memory).
        with torch.no_grad():
            for parameter in base.parameters():
                parameter.zero_()
        phase("base_fill_s")
        base_rss = rss_mb()

        names = [f"in{i}" for i in range(len(spec["inputs"]))]
        model = PeftModel.from_pretrained(base, spec["inputs"][0], adapter_name=names[0])
        for name, folder in zip(names[1:], spec["inputs"][1:]):
            model.load_adapter(folder, adapter_name=name)
        phase("load_s")
        model.add_weighted_adapter(names, spec["b"], "merged", combination_type="cat")
        phase("merge_s")
        model.save_pretrained(spec["output"], selected_adapters=["merged"])
        phase("save_s")
    saved = Path(spec["output"]) / "merged" / "adapter_model.safetensors"
    step = measure.result["step_s"]
    return {
        **measure.result,
        **phases,
        "without_base_s": step - phases["base_alloc_s"] - phases["base_fill_s"],
        "allocated_base_s": step - phases["base_fill_s"],
        "base_rss_mb": base_rss,
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "output_bytes": os.path.getsize(saved),
    }


# --- digest throughput ----------------------------------------------------------------------------


def run_digest(spec: dict) -> dict:
    import hashlib

    buffer = os.urandom(spec["megabytes"] << 20)
    best = 0.0
    for _ in range(spec.get("runs", 3)):
        start = time.perf_counter()
        hashlib.sha256(buffer).hexdigest()
        best = max(best, len(buffer) / (time.perf_counter() - start))
    return {"sha256_bytes_per_s": best, "megabytes": spec["megabytes"]}


KINDS = {"setup": setup, "registry": run_registry, "naive": run_naive, "peft": run_peft, "digest": run_digest}


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = KINDS[spec["kind"]](spec)
    result["worker_s"] = time.perf_counter() - T0
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
