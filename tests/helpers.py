"""Real PEFT adapters on tiny models built from configs (no download), for the tests.

Adapter weights are set from a seeded generator rather than PEFT's initialisation (which
makes LoRA's B zero and (IA)^3's vectors one), so that every arithmetic mistake shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

LLAMA_ID = "tiny-org/tiny-llama"
BERT_ID = "tiny-org/tiny-bert"

# The hosts of the porting tests (SEMANTICS.md section 5), shared by test_port_hosts.py and
# test_port_modules.py. X is tiny_llama's own config, written out by hand; Y has another
# vocabulary (compatible); Z another hidden size and fewer key/value heads, W one layer
# (both incompatible).
X_ID = LLAMA_ID
Y_ID = "tiny-org/tiny-llama-v2"
Z_ID = "tiny-org/tiny-llama-wide"
W_ID = "tiny-org/tiny-llama-shallow"
X_DIMS = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
)
HOSTS = {
    X_ID: X_DIMS,
    Y_ID: {**X_DIMS, "vocab_size": 80},
    Z_ID: {**X_DIMS, "hidden_size": 32, "num_key_value_heads": 1},
    W_ID: {**X_DIMS, "num_hidden_layers": 1},
}


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    model.name_or_path = model.config._name_or_path = LLAMA_ID
    return model.eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.name_or_path = model.config._name_or_path = BERT_ID
    return model.eval()


def _randomize(peft_model, seed: int, param_marker: str, center: float, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param_marker in name:
                param.copy_(center + scale * torch.randn(param.shape, generator=generator))


def make_lora(
    directory: Path, *, seed: int, model: str = "llama", r: int = 4, lora_alpha: float = 8,
    target_modules: Any = ("q_proj", "v_proj"), **config: Any,
) -> Path:
    """Save a LoRA adapter with random A and B to ``directory``; returns it."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama() if model == "llama" else tiny_bert()
    if model == "bert" and target_modules == ("q_proj", "v_proj"):
        target_modules = ("query", "value")
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), **config)
    peft_model = get_peft_model(base, lora)
    _randomize(peft_model, seed, "lora_", 0.0, 0.3)
    peft_model.save_pretrained(directory)
    return directory


def make_ia3(
    directory: Path, *, seed: int, model: str = "llama",
    target_modules: Any = ("k_proj", "v_proj", "down_proj"), feedforward_modules: Any = ("down_proj",), **config: Any,
) -> Path:
    """Save an (IA)^3 adapter with vectors 1 + noise to ``directory``; returns it."""
    from peft import IA3Config, get_peft_model

    base = tiny_llama() if model == "llama" else tiny_bert()
    if model == "bert" and target_modules == ("k_proj", "v_proj", "down_proj"):
        target_modules, feedforward_modules = ("key", "value", "output.dense"), ("output.dense",)
    ia3 = IA3Config(target_modules=list(target_modules), feedforward_modules=list(feedforward_modules), **config)
    peft_model = get_peft_model(base, ia3)
    _randomize(peft_model, seed, "ia3_l", 1.0, 0.2)
    peft_model.save_pretrained(directory)
    return directory


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))
