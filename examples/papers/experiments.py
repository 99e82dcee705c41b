"""The four experiments. Every registration, composition and port goes through the registry's
public API (``Registry`` and the objects its methods return); modules are loaded back from
the folders ``Registry.export`` writes, so what is measured is what the registry made."""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from examples.papers import models as M
from examples.papers import synthetic as syn

X_ID = "papers/host-x"
Y_ID = "papers/host-y"


def stat(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n-1; 0 for one seed) over seeds."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values), "values": values}


@dataclass
class Context:
    registry: Any
    h: M.Hyper
    work: Path
    namespace: str
    hosts: dict[str, M.Host]
    corpora: dict[str, syn.Corpus]
    log: Callable[[str], None] = print
    made: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"trained": [], "composed": [], "ported": []})
    _folders: itertools.count = field(default_factory=itertools.count)

    def name(self, text: str) -> str:
        return f"{self.namespace}/{text}"

    def folder(self, label: str) -> Path:
        return self.work / f"{next(self._folders):04d}-{label}"

    # --- the registry -------------------------------------------------------------------------

    def register(self, peft_model, label: str, experiment: str, task: str, tags: dict[str, str]) -> str:
        folder = self.folder(label)
        peft_model.save_pretrained(str(folder))
        info = self.registry.add(folder, self.name(label), task=task, tags={"experiment": experiment, **tags})
        self.made["trained"].append({"ref": info.ref, "experiment": experiment})
        return info.ref

    def compose(self, expression: str, label: str, method: str, experiment: str, inputs: list[str]) -> str:
        info = self.registry.compose(expression, self.name(label), method=method, new_version=True)
        self.made["composed"].append({"ref": info.ref, "expression": expression, "method": method,
                                      "inputs": inputs, "experiment": experiment})
        return info.ref

    def load(self, ref: str, host: str, trainable: bool = False):
        folder = self.registry.export(ref, self.folder(ref.replace("/", "_").replace("@", "_v")))
        return M.load_adapter(self.hosts[host], folder, trainable=trainable), folder


def _task_sets(h: M.Hyper, g: torch.Generator, task: str, domains: tuple[int, ...]) -> tuple[syn.Batch, syn.Batch]:
    return syn.task_examples(task, h.train_examples, g, domains), syn.task_examples(task, h.test_examples, g, domains)


def _train_task(ctx: Context, kind: str, host: str, data: syn.Batch, init_seed: int, order_seed: int,
                drifts: list[float] | None = None):
    """A task module from PEFT's default initialisation after ``torch.manual_seed(init_seed)``;
    for LoRA, how far A moved from its initialisation is appended to ``drifts``."""
    model = M.new_adapter(ctx.hosts[host], kind, ctx.h, init_seed)
    initial = M.lora_a(model) if kind == "lora" else {}
    batches = M.task_batches(data, ctx.h.batch, torch.Generator().manual_seed(order_seed))
    M.train_adapter(model, lambda step: M.task_loss(model, batches(step)), ctx.h.task_steps, M.lr_for(kind, ctx.h))
    if drifts is not None and initial:
        drifts.append(M.drift(initial, M.lora_a(model)))
    return model


# --- 1. distribution generalisation -----------------------------------------------------------


def distribution(ctx: Context) -> dict[str, Any]:
    """One task (sentiment), two training subsets with disjoint vocabularies (domain 1 and
    domain 2 words). LoRA modules from one initialisation, one per subset and one on the
    union; 0.5*m1 + 0.5*m2 composed with `module` and with `exact`."""
    h = ctx.h
    arms = ["m1 (domain 1)", "m2 (domain 2)", "0.5*m1+0.5*m2 module", "0.5*m1+0.5*m2 exact",
            "union-trained (reference)"]
    short = ["m1", "m2", "merge-module", "merge-exact", "union-trained"]
    scores: dict[str, dict[str, list[float]]] = {a: {"domain 1": [], "domain 2": [], "union": []} for a in arms}
    deviations: list[float] = []
    drifts: list[float] = []
    for seed in h.seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        train1, test1 = _task_sets(h, g, "sentiment", (1,))
        train2, test2 = _task_sets(h, g, "sentiment", (2,))
        union_train = train1.cat(train2).shuffled(g)
        refs = {}
        for label, data, key in (("d1", train1, arms[0]), ("d2", train2, arms[1]), ("union", union_train, arms[4])):
            seed_drifts: list[float] = []
            model = _train_task(ctx, "lora", "x", data, init_seed=seed, order_seed=10 * seed + len(refs),
                                drifts=seed_drifts)
            if label != "union":
                drifts.extend(seed_drifts)
            refs[key] = ctx.register(model, f"dist-{label}-s{seed}", "distribution", "sentiment",
                                     {"subset": label, "seed": str(seed)})
        expression = f"0.5*{refs[arms[0]]} + 0.5*{refs[arms[1]]}"
        inputs = [refs[arms[0]], refs[arms[1]]]
        refs[arms[2]] = ctx.compose(expression, f"dist-merge-module-s{seed}", "module", "distribution", inputs)
        refs[arms[3]] = ctx.compose(expression, f"dist-merge-exact-s{seed}", "exact", "distribution", inputs)
        deviations.append(ctx.registry.check(expression, method="module", deviation=True).deviation.overall)
        union_test = test1.cat(test2)
        for arm in arms:
            model, _ = ctx.load(refs[arm], "x")
            scores[arm]["domain 1"].append(M.accuracy(model, test1, "sentiment"))
            scores[arm]["domain 2"].append(M.accuracy(model, test2, "sentiment"))
            scores[arm]["union"].append(M.accuracy(model, union_test, "sentiment"))
        ctx.log(f"  distribution seed {seed}: union accuracy " + ", ".join(
            f"{label}={scores[a]['union'][-1]:.3f}" for label, a in zip(short, arms)))
    arms_out = {a: {k: stat(v) for k, v in s.items()} for a, s in scores.items()}
    return {"metric": "accuracy", "arms": arms_out, "deviation": stat(deviations), "seeds": len(h.seeds),
            "a_drift": stat([(a + b) / 2 for a, b in zip(drifts[0::2], drifts[1::2])])}


# --- 2. multi-tasking ---------------------------------------------------------------------------


def multitask(ctx: Context) -> dict[str, Any]:
    """Two tasks (sentiment, topic) on host X; one module per task from one initialisation,
    merged as 0.5*a + 0.5*b. LoRA (`module` and `exact`) and (IA)^3 (`module`)."""
    h = ctx.h
    out: dict[str, Any] = {"metric": "accuracy", "seeds": len(h.seeds)}
    for kind in ("lora", "ia3"):
        arms = ["host (no module)", "sentiment module", "topic module", "0.5*sent+0.5*topic module"]
        if kind == "lora":
            arms.append("0.5*sent+0.5*topic exact")
        scores = {a: {"sentiment": [], "topic": []} for a in arms}
        deviations: list[float] = []
        drifts: list[float] = []
        for seed in h.seeds:
            g = torch.Generator().manual_seed(2000 + seed)
            data = {task: _task_sets(h, g, task, (1, 2)) for task in ("sentiment", "topic")}
            refs: dict[str, str | None] = {arms[0]: None}
            for n, (task, arm) in enumerate((("sentiment", arms[1]), ("topic", arms[2]))):
                model = _train_task(ctx, kind, "x", data[task][0], init_seed=seed, order_seed=10 * seed + n,
                                    drifts=drifts)
                refs[arm] = ctx.register(model, f"mt-{kind}-{task}-s{seed}", "multitask", task,
                                         {"peft": kind, "seed": str(seed)})
            expression = f"0.5*{refs[arms[1]]} + 0.5*{refs[arms[2]]}"
            inputs = [refs[arms[1]], refs[arms[2]]]
            refs[arms[3]] = ctx.compose(expression, f"mt-{kind}-merge-module-s{seed}", "module", "multitask", inputs)
            if kind == "lora":
                refs[arms[4]] = ctx.compose(expression, f"mt-{kind}-merge-exact-s{seed}", "exact", "multitask", inputs)
                deviations.append(ctx.registry.check(expression, method="module", deviation=True).deviation.overall)
            for arm in arms:
                model = ctx.hosts["x"].model() if refs[arm] is None else ctx.load(refs[arm], "x")[0]
                for task in ("sentiment", "topic"):
                    scores[arm][task].append(M.accuracy(model, data[task][1], task))
            merged = scores[arms[3]]
            ctx.log(f"  multitask {kind} seed {seed}: merge (module) sentiment={merged['sentiment'][-1]:.3f} "
                    f"topic={merged['topic'][-1]:.3f}")
        out[kind] = {a: {k: stat(v) for k, v in s.items()} for a, s in scores.items()}
        if deviations:
            out[f"{kind} deviation"] = stat(deviations)
            out[f"{kind} a_drift"] = stat([(a + b) / 2 for a, b in zip(drifts[0::2], drifts[1::2])])
    return out


# --- 3. unlearning by negation ------------------------------------------------------------------


def _effect_scale(folder: Path, reference: Path, kind: str) -> float:
    """How much of the reference module's effect a module carries, measured on the exported
    tensors: LoRA <dW, dW_ref> / |dW_ref|^2 over all layers (dW = alpha/r * B@A; with
    per-layer rank the exported config's alpha and r apply); (IA)^3 the same on l - 1."""

    def effects(path: Path) -> dict[str, torch.Tensor]:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        config = json.loads((path / "adapter_config.json").read_text())
        if kind == "ia3":
            return {k: v.float() - 1.0 for k, v in tensors.items()}
        scale = config["lora_alpha"] / config["r"]
        out = {}
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                out[key] = scale * b.float() @ a.float()
        return out

    mine, ref = effects(folder), effects(reference)
    num = sum((mine[k] * ref[k]).sum() for k in ref)
    den = sum((ref[k] * ref[k]).sum() for k in ref)
    return float(num / den)


def unlearning(ctx: Context) -> dict[str, Any]:
    """Host X emits marked tokens at a base rate; a module fine-tuned on text rich in them
    raises the rate; the registry's `-lam*module` applied to host X should lower it below the
    base rate while clean perplexity stays close."""
    h = ctx.h
    out: dict[str, Any] = {"metrics": ["marked rate", "clean perplexity"], "seeds": len(h.seeds),
                           "lambdas": list(h.lambdas)}
    corpus = ctx.corpora["1"]
    for kind in ("lora", "ia3"):
        methods = ("exact", "module") if kind == "lora" else ("module",)
        negated = [f"host - {lam:g}*m {meth}" for meth in methods for lam in h.lambdas]
        arms = ["host", "host + m (fine-tuned)", *negated]
        rows = {a: {"marked rate": [], "clean perplexity": [], "effect scale": []} for a in arms}
        for seed in h.seeds:
            g = torch.Generator().manual_seed(3000 + seed)
            clean = corpus.sample(h.lm_eval_sequences, g, 0.0)
            model = M.new_adapter(ctx.hosts["x"], kind, h, seed)
            model.train()
            M.train_adapter(model, lambda _s: M.lm_loss(model, corpus.sample(h.batch, g, h.toxic_p_marked)),
                            h.toxic_steps, M.lr_for(kind, h))
            ref = ctx.register(model, f"toxic-{kind}-s{seed}", "unlearning", "marked-text",
                               {"peft": kind, "seed": str(seed)})
            refs: dict[str, str | None] = {arms[0]: None, arms[1]: ref}
            for meth in methods:
                for lam in h.lambdas:
                    refs[f"host - {lam:g}*m {meth}"] = ctx.compose(
                        f"-{lam:g}*{ref}", f"unlearn-{kind}-{meth}-l{lam:g}-s{seed}", meth, "unlearning", [ref])
            _, ref_folder = ctx.load(ref, "x")
            for arm in arms:
                if refs[arm] is None:
                    model, scale = ctx.hosts["x"].model(), 0.0
                else:
                    model, folder = ctx.load(refs[arm], "x")
                    scale = _effect_scale(folder, ref_folder, kind)
                rate, ppl = M.behaviour(model, clean)
                rows[arm]["marked rate"].append(rate)
                rows[arm]["clean perplexity"].append(ppl)
                rows[arm]["effect scale"].append(scale)
            ctx.log(f"  unlearning {kind} seed {seed}: marked rate host={rows['host']['marked rate'][-1]:.4f}, "
                    + ", ".join(f"{a.removeprefix('host ')}={rows[a]['marked rate'][-1]:.4f}" for a in arms[1:]))
        out[kind] = {a: {k: stat(v) for k, v in r.items()} for a, r in rows.items()}
    return out


# --- 4. porting ---------------------------------------------------------------------------------


def porting(ctx: Context) -> dict[str, Any]:
    """A sentiment module trained on host X, ported to host Y (X pre-trained further on
    corpus 2) with `add_base` + `port`; on Y, ported vs PEFT's default initialisation vs
    parameters sampled per tensor from the ported module's mean and std, each then
    fine-tuned with the same budget."""
    h = ctx.h
    folder = ctx.work / "hosts"
    ctx.registry.add_base(X_ID, config_path=ctx.hosts["x"].save_config(folder / "x"))
    ctx.registry.add_base(Y_ID, config_path=ctx.hosts["y"].save_config(folder / "y"))
    budgets = list(h.port_budgets)
    out: dict[str, Any] = {"metric": "accuracy on host Y", "budgets": budgets, "seeds": len(h.seeds)}
    for kind in ("lora", "ia3"):
        arms = ["ported", "default init", "sampled init"]
        curves = {a: {str(b): [] for b in budgets} for a in arms}
        on_x: list[float] = []
        for seed in h.seeds:
            g = torch.Generator().manual_seed(4000 + seed)
            train_x, test = _task_sets(h, g, "sentiment", (1, 2))
            train_y = syn.task_examples("sentiment", h.train_examples, g, (1, 2))
            source = _train_task(ctx, kind, "x", train_x, init_seed=seed, order_seed=10 * seed)
            on_x.append(M.accuracy(source, test, "sentiment"))
            src_ref = ctx.register(source, f"port-{kind}-src-s{seed}", "porting", "sentiment",
                                   {"peft": kind, "seed": str(seed)})
            info = ctx.registry.port(src_ref, to=Y_ID, name=ctx.name(f"port-{kind}-on-y-s{seed}"))
            ctx.made["ported"].append({"ref": info.ref, "from": src_ref, "to": Y_ID, "experiment": "porting"})
            ported, _ = ctx.load(info.ref, "y", trainable=True)
            ported_tensors = {n: p.detach().clone() for n, p in ported.named_parameters() if p.requires_grad}
            models = {"ported": ported, "default init": M.new_adapter(ctx.hosts["y"], kind, h, 100 + seed)}
            sampled = M.new_adapter(ctx.hosts["y"], kind, h, 100 + seed)
            M.sample_like(sampled, ported_tensors, torch.Generator().manual_seed(200 + seed))
            models["sampled init"] = sampled
            for arm, model in models.items():
                # the same batches, in the same order, for every arm
                batches = M.task_batches(train_y, h.batch, torch.Generator().manual_seed(300 + seed))
                checkpoints = {b: (lambda b, arm: lambda m: curves[arm][str(b)].append(
                    M.accuracy(m, test, "sentiment")))(b, arm) for b in budgets}
                M.train_adapter(model, lambda step, model=model, batches=batches: M.task_loss(model, batches(step)),
                                max(budgets), M.lr_for(kind, h), checkpoints)
            ctx.log(f"  porting {kind} seed {seed}: on X {on_x[-1]:.3f}; on Y at 0 steps " + ", ".join(
                f"{a}={curves[a][str(budgets[0])][-1]:.3f}" for a in arms))
        out[kind] = {"source on host X": stat(on_x),
                     "arms": {a: {b: stat(v) for b, v in c.items()} for a, c in curves.items()}}
    return out
