"""Tiny hosts, training loops and measurements. Plain PyTorch + PEFT; nothing here touches the
registry (the experiments do, through its public API only)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from examples.papers import synthetic as syn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ["down_proj"]


@dataclass(frozen=True)
class Hyper:
    """Every hyperparameter, fixed once for the whole study and every arm."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 600          # host X on corpus 1
    shift_steps: int = 300             # host Y = X trained further on corpus 2
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    host_p_marked: float = 0.03        # marked tokens in host X's pre-training text
    toxic_p_marked: float = 0.30       # ... and in the text the "toxic" modules are trained on
    lora_r: int = 8
    lora_alpha: int = 16
    lora_lr: float = 3e-3
    ia3_lr: float = 1e-1
    batch: int = 32
    task_steps: int = 200              # fine-tuning steps of every task module
    toxic_steps: int = 150             # fine-tuning steps of the marked-behaviour modules
    train_examples: int = 2000         # per training set (per subset in experiment 1)
    test_examples: int = 1000          # per test set
    lm_eval_sequences: int = 256
    port_budgets: tuple[int, ...] = (0, 10, 25, 50, 100)
    lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def smoke(cls) -> "Hyper":
        return cls(
            hidden=32, intermediate=64, pretrain_steps=30, shift_steps=15, pretrain_batch=16, batch=16,
            task_steps=8, toxic_steps=8, train_examples=64, test_examples=64, lm_eval_sequences=32,
            port_budgets=(0, 2, 4), lambdas=(0.5, 1.0), seeds=(0,),
        )


@dataclass
class Host:
    """A pre-trained host: its id (as recorded in adapters and the registry), its config and
    weights. ``model()`` gives a fresh copy that an adapter can be injected into."""

    model_id: str
    config: object
    state: dict[str, torch.Tensor] = field(repr=False)

    def model(self):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(self.config)
        model.load_state_dict(self.state)
        model.name_or_path = model.config._name_or_path = self.model_id
        return model.eval()

    def save_config(self, folder: Path) -> Path:
        """config.json with ``architectures`` set (what `Registry.add_base` reads)."""
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = ["LlamaForCausalLM"]
        config["_name_or_path"] = self.model_id
        path = folder / "config.json"
        path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        return path


def llama_config(h: Hyper):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=syn.VOCAB, hidden_size=h.hidden, intermediate_size=h.intermediate, num_hidden_layers=h.layers,
        num_attention_heads=h.heads, num_key_value_heads=h.heads, max_position_embeddings=64,
        bos_token_id=syn.BOS, eos_token_id=None, pad_token_id=syn.PAD, tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def pretrain(model, sample: Callable[[int], torch.Tensor], steps: int, lr: float, batch: int) -> list[float]:
    """Full-parameter language-model training on batches from ``sample(batch)``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, sample(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def make_host(model_id: str, h: Hyper, seed: int, corpus: syn.Corpus, p_marked: float,
              steps: int, start: Host | None = None) -> Host:
    """Pre-train a host (from scratch, or from ``start``) on ``corpus``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if start is None:
        model = LlamaForCausalLM(llama_config(h))
    else:
        model = start.model()
    g = torch.Generator().manual_seed(seed)
    pretrain(model, lambda n: corpus.sample(n, g, p_marked), steps, h.pretrain_lr, h.pretrain_batch)
    return Host(model_id, copy.deepcopy(model.config), {k: v.detach().clone() for k, v in model.state_dict().items()})


# --- adapters ---------------------------------------------------------------------------------


def lora_config(h: Hyper):
    from peft import LoraConfig

    return LoraConfig(r=h.lora_r, lora_alpha=h.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def ia3_config(h: Hyper):
    from peft import IA3Config

    return IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD, task_type="CAUSAL_LM")


def new_adapter(host: Host, kind: str, h: Hyper, init_seed: int):
    """PEFT's default initialisation (LoRA: A random, B zero; (IA)^3: ones) after
    ``torch.manual_seed(init_seed)``: the same seed gives the same A."""
    from peft import get_peft_model

    model = host.model()
    torch.manual_seed(init_seed)
    return get_peft_model(model, lora_config(h) if kind == "lora" else ia3_config(h))


def load_adapter(host: Host, folder: Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(host.model(), str(folder), is_trainable=trainable).eval()


def lr_for(kind: str, h: Hyper) -> float:
    return h.lora_lr if kind == "lora" else h.ia3_lr


def task_loss(model, batch: syn.Batch) -> torch.Tensor:
    logits = model(input_ids=batch.inputs).logits[:, -1]
    return F.cross_entropy(logits, batch.answers)


def train_adapter(model, loss_of: Callable[[object], torch.Tensor], steps: int, lr: float,
                  checkpoints: dict[int, Callable[[object], None]] | None = None) -> None:
    """Adam on the adapter's trainable parameters only; ``loss_of(step)`` gives the loss of
    the batch of that step. ``checkpoints[n]`` is called after ``n`` steps (0 before any)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    checkpoints = checkpoints or {}
    if 0 in checkpoints:
        model.eval()
        checkpoints[0](model)
    for step in range(1, steps + 1):
        model.train()
        loss = loss_of(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            model.eval()
            checkpoints[step](model)
    model.eval()


def task_batches(data: syn.Batch, batch: int, g: torch.Generator) -> Callable[[int], syn.Batch]:
    """Epochs over ``data``, reshuffled each epoch with ``g``."""
    state = {"order": torch.randperm(len(data), generator=g), "pos": 0}

    def next_batch(_step: int) -> syn.Batch:
        if state["pos"] + batch > len(data):
            state["order"], state["pos"] = torch.randperm(len(data), generator=g), 0
        idx = state["order"][state["pos"]:state["pos"] + batch]
        state["pos"] += batch
        return syn.Batch(data.inputs[idx], data.answers[idx], data.labels[idx])

    return next_batch


# --- measurements -----------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, data: syn.Batch, task: str) -> float:
    """Accuracy of the restricted argmax over the task's two answer tokens."""
    answers = list(syn.TASKS[task]["answers"])
    logits = model(input_ids=data.inputs).logits[:, -1, answers]
    return (logits.argmax(-1) == data.labels).float().mean().item()


@torch.no_grad()
def behaviour(model, clean: torch.Tensor) -> tuple[float, float]:
    """(marked rate, clean perplexity) on clean text: the mean probability the model gives
    to the eight marked tokens as the next token (the expected share of marked tokens when
    sampling at temperature 1 after a clean prefix), and the perplexity of the clean text."""
    logits = model(input_ids=clean).logits[:, :-1].float()
    logp = logits.log_softmax(-1)
    rate = logp[..., syn.MARKED].exp().sum(-1).mean().item()
    nll = -logp.gather(-1, clean[:, 1:, None]).mean().item()
    return rate, math.exp(nll)


def lora_a(model) -> dict[str, torch.Tensor]:
    """The LoRA A matrices of a PEFT model (copies)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """|after - before|_F / |before|_F over all tensors together."""
    num = sum(((after[k] - before[k]).float() ** 2).sum() for k in before)
    den = sum((before[k].float() ** 2).sum() for k in before)
    return float((num / den).sqrt())


def sample_like(model, reference: dict[str, torch.Tensor], g: torch.Generator) -> None:
    """Set each trainable adapter tensor to i.i.d. normal draws with the mean and std of the
    same-named tensor in ``reference`` (the paper's "sampled from the same distribution")."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            ref = reference[name]
            draws = torch.randn(param.shape, generator=g) * ref.float().std() + ref.float().mean()
            param.copy_(draws.to(param.dtype))
