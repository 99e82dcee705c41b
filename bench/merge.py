"""Merge-method benchmark: svd, TIES and DARE in full and core space, against `exact` and PEFT.

    python bench/merge.py [--inputs 2,4,8] [--layers 32] [--subset-layers 1]
                          [--subset-projections q_proj,...] [--no-peft] [--no-full] [--workdir DIR]
    python bench/compose.py --merges      # the same, after compose.py's own cases

Inputs: LoRA adapters with the shapes of a 7B Llama decoder, rank 16, alpha 32, bf16
(bench/_compose_worker.py's generator). Every measurement is a fresh process; "step" is the
work after imports (the registry: ``Registry.compose`` with the method and its parameters,
output hashed, fsynced and registered; PEFT: loading the adapters into a base model,
``add_weighted_adapter`` with the ``*_svd`` combination type, ``save_pretrained``), "proc" the
whole process; memory is the step's peak resident set.

Two sets of adapters:
- whole: --layers decoder layers (default 32, a whole 7B adapter) for the methods that scale
  with the factors: exact (the baseline), svd, ties and dare_ties in core space;
- subset: --subset-layers decoder layers (default 1) restricted to --subset-projections
  (default all seven) for the dense routes: ties in full space and PEFT's svd, ties_svd and
  dare_ties_svd, whose dense SVD of every delta (4096x11008: tens of seconds each) makes a whole
  adapter take hours. The registry's fast routes are measured on the subset too, so every
  ratio compares the same layers. PEFT's base is a Llama with the subset's decoder layers
  (hidden 4096, intermediate 11008, vocabulary 128: the embeddings do not matter to a merge),
  built on the meta device and zero-filled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compose import coefficients, copy_database, expression, load_average, remove_database, worker_env  # noqa: E402

DENSITY, SEED = 0.2, 7
# (label, method, parameters, PEFT combination type or None, routes: whole and/or subset)
CASES = [
    ("exact", "exact", {}, None, ("whole", "subset")),
    ("svd", "svd", {}, "svd", ("whole", "subset")),
    ("ties core", "ties", {"density": DENSITY, "space": "core"}, None, ("whole", "subset")),
    ("dare_ties core", "dare_ties", {"density": DENSITY, "seed": SEED, "space": "core"}, None, ("whole", "subset")),
    ("ties full", "ties", {"density": DENSITY}, "ties_svd", ("subset",)),
    ("dare_ties full", "dare_ties", {"density": DENSITY, "seed": SEED}, "dare_ties_svd", ("subset",)),
]


# --- workers (this file, run with --worker SPEC) ----------------------------------------------------


def generate(spec: dict) -> dict:
    """Adapters of the given decoder layers and projections, registered in a fresh SQLite registry."""
    import torch
    from _compose_worker import PROJECTIONS, adapter_config, warm
    from safetensors.torch import save_file

    from registry import Registry

    workdir = Path(spec["workdir"])
    projections = {p: s for p, s in PROJECTIONS.items() if p.rpartition(".")[2] in spec["projections"]}
    home = workdir / "registry"
    registry = Registry.init(home, database_url=f"sqlite:///{home / 'registry.db'}", store=str(home / "blobs"))
    blobs, folders = [], []
    for index in range(spec["count"]):
        folder = workdir / "adapters" / f"lora-{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(spec["seed"] * 1000 + index)
        tensors = {}
        for layer in range(spec["layers"]):
            for proj, (fan_in, fan_out) in projections.items():
                prefix = f"base_model.model.model.layers.{layer}.{proj}"
                a = torch.randn((16, fan_in), generator=generator) / fan_in**0.5
                tensors[f"{prefix}.lora_A.weight"] = a.bfloat16()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn((fan_out, 16), generator=generator) * 0.02).bfloat16()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {**adapter_config(), "target_modules": sorted(p.rpartition(".")[2] for p in projections)}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        info = registry.add(folder, f"bench/lora-{index:02d}")
        blobs.append(str(registry.store.local_path(info.digest)))
        folders.append(str(folder))
    registry.close()
    warm(blobs)
    return {"home": str(home), "database": str(home / "registry.db"), "store": str(home / "blobs"),
            "blobs": blobs, "folders": folders}


def run_registry(spec: dict) -> dict:
    from _compose_worker import Measure

    from registry import Registry

    Registry  # noqa: B018
    import registry.adapters.lora.compute  # noqa: F401  (torch imported before the step, as in compose.py)
    import registry.compose.engine  # noqa: F401

    registry = Registry.open(spec["home"], database_url=f"sqlite:///{spec['database']}", store=spec["store"])
    measure = Measure()
    with measure:
        info = registry.compose(spec["expression"], spec["name"], method=spec["method"], **spec["parameters"])
    results = registry.get(info.ref).provenance.results
    registry.close()
    assert info.created
    return {**measure.result, "digest": info.digest, "error": results.get("relative_truncation_error")}


def run_peft(spec: dict) -> dict:
    import torch
    from _compose_worker import INTERMEDIATE, HIDDEN, Measure
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    measure = Measure()
    with measure:
        config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=spec["layers"],
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=128)
        with torch.device("meta"):
            base = LlamaForCausalLM(config).to(torch.bfloat16)
        base = base.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in base.parameters():
                parameter.zero_()
        names = [f"in{i}" for i in range(len(spec["inputs"]))]
        model = PeftModel.from_pretrained(base, spec["inputs"][0], adapter_name=names[0])
        for name, folder in zip(names[1:], spec["inputs"][1:]):
            model.load_adapter(folder, adapter_name=name)
        merge_start = time.perf_counter()
        torch.manual_seed(SEED)
        options = {"density": DENSITY} if spec["combination"] != "svd" else {}
        model.add_weighted_adapter(names, spec["weights"], "merged", combination_type=spec["combination"], **options)
        merge_s = time.perf_counter() - merge_start
        model.save_pretrained(spec["output"], selected_adapters=["merged"])
    return {**measure.result, "merge_s": merge_s}


WORKERS = {"generate": generate, "registry": run_registry, "peft": run_peft}


def worker(spec: dict) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=worker_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"worker {spec['kind']} failed (exit {proc.returncode})")
    return {**json.loads(lines[-1]), "process_s": time.perf_counter() - started}


# --- the parent ---------------------------------------------------------------------------------


def measure_set(label: str, setup: dict, inputs: list[int], peft_layers: int | None, args, runs: Path) -> dict:
    results: dict = {}
    for n in inputs:
        for name, method, parameters, combination, routes in CASES:
            if label not in routes or (args.no_full and name.endswith("full")):
                continue
            database = runs / f"{label}-{name.replace(' ', '-')}-{n}.db"
            copy_database(setup["database"], database)
            print(f"{label}: {name} x{n}", flush=True)
            try:
                results[(name, n)] = worker({
                    "kind": "registry", "home": setup["home"], "database": str(database), "store": setup["store"],
                    "expression": expression(n), "name": f"bench/{method}-{n}", "method": method,
                    "parameters": parameters})
            finally:
                remove_database(database)
            digest = results[(name, n)]["digest"]
            Path(setup["store"], "sha256", digest[:2], digest[2:]).unlink(missing_ok=True)
            if combination and peft_layers and not args.no_peft:
                print(f"{label}: PEFT {combination} x{n}", flush=True)
                output = runs / f"peft-{combination}-{n}"
                results[(name, n, "peft")] = worker({
                    "kind": "peft", "inputs": setup["folders"][:n], "weights": [float(w) for w in coefficients(n)],
                    "combination": combination, "layers": peft_layers, "output": str(output)})
                shutil.rmtree(output, ignore_errors=True)
    return results


def print_table(title: str, results: dict, inputs: list[int]) -> None:
    lines = [title, "",
             "| method | inputs | step s | proc s | peak MB | step / exact | truncation error | PEFT step s "
             "(merge s) | PEFT peak MB | PEFT / registry (step) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, *_ in CASES:
        for n in inputs:
            r = results.get((name, n))
            if r is None:
                continue
            exact = results.get(("exact", n))
            p = results.get((name, n, "peft"))
            error = "-" if r.get("error") is None else f"{r['error']:.3g}"
            peft_cells = (f"{p['step_s']:.1f} ({p['merge_s']:.1f}) | {p['step_peak_mb']:.0f} | "
                          f"{p['step_s'] / r['step_s']:.1f}x" if p else "- | - | -")
            lines.append(f"| {name} | {n} | {r['step_s']:.2f} | {r['process_s']:.2f} | {r['step_peak_mb']:.0f} | "
                         f"{r['step_s'] / exact['step_s']:.2f}x | {error} | {peft_cells} |")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default="2,4,8")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the whole adapters")
    parser.add_argument("--subset-layers", type=int, default=1, help="decoder layers of the dense-route subset")
    parser.add_argument("--subset-projections", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--no-full", action="store_true", help="skip the dense routes (ties full, PEFT)")
    parser.add_argument("--no-whole", action="store_true", help="measure the subset only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        sys.stdout.write("\n" + json.dumps(WORKERS[spec["kind"]](spec)) + "\n")
        return
    inputs = [int(n) for n in args.inputs.split(",")]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pem-bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), load_average()
    try:
        runs = workdir / "runs"
        runs.mkdir(exist_ok=True)
        all_projections = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(",")
        subset_projections = args.subset_projections.split(",")
        shape = f"{args.subset_layers} decoder layer(s) x ({', '.join(subset_projections)})"
        print(f"generating {max(inputs)} subset adapters: {shape}", flush=True)
        subset = worker({"kind": "generate", "workdir": str(workdir / "subset"), "layers": args.subset_layers,
                         "projections": subset_projections, "count": max(inputs), "seed": args.seed})
        subset_results = measure_set("subset", subset, inputs, args.subset_layers, args, runs)
        print_table(f"\nsubset: {shape}, rank 16 bf16 inputs, density {DENSITY}, dare seed {SEED}", subset_results, inputs)
        if not args.no_whole:
            print(f"generating {max(inputs)} whole adapters ({args.layers} layers x 7 projections)", flush=True)
            whole = worker({"kind": "generate", "workdir": str(workdir / "whole"), "layers": args.layers,
                            "projections": all_projections, "count": max(inputs), "seed": args.seed})
            whole_results = measure_set("whole", whole, inputs, None, args, runs)
            print_table(f"\nwhole adapters: {args.layers} decoder layers x 7 projections (7B shapes)", whole_results, inputs)
        threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
        print(f"\ntorch threads: {threads}; the registry pins its SVDs to 1 thread; load average at start / end: "
              f"{load_start} / {load_average()}; total {time.perf_counter() - started:.0f} s")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
