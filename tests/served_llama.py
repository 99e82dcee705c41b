"""A tiny Llama that vLLM's CPU backend serves, and LoRAs trained to change its greedy tokens.

vLLM's CPU attention refuses head_dim 16, so this model has hidden 128 and 2 heads (head_dim
64), 2 layers and a 128-word WordLevel tokenizer. Prompts are token ids, so the tokenizer only
has to load. Each LoRA is trained (teacher forcing, a few dozen Adam steps) to continue
:data:`PROMPT` with its own target sequence, so the tokens it produces differ from the base
model's and from each other's.
"""

from __future__ import annotations

from pathlib import Path

import torch

SERVED_ID = "tiny-org/served-llama"  # the registry's name of the served model (PEM_VLLM_BASE_MODEL)
VOCAB = 128
PROMPT = [5, 6, 7, 8, 9]
NEW_TOKENS = 8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_base(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    ).save_pretrained(folder)
    return folder


def load_base(folder: Path, name_or_path: str = SERVED_ID):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.name_or_path = model.config._name_or_path = name_or_path  # what PEFT records as the base
    model.generation_config.eos_token_id = None  # like vLLM's ignore_eos
    return model.eval()


def train_lora(base_folder: Path, out: Path, target: list[int], *, seed: int, steps: int = 40,
               base_id: str = SERVED_ID, **config) -> Path:
    """A rank-8 LoRA trained so that the model continues PROMPT with ``target``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_folder, base_id),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGET_MODULES, **config))
    ids = torch.tensor([PROMPT + target])
    labels = ids.clone()
    labels[0, : len(PROMPT)] = -100
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.save_pretrained(out, save_embedding_layers=False)  # no look-up of the made-up base on the Hub
    return out


def peft_tokens(base_folder: Path, adapter_folder: Path | None) -> list[int]:
    """Greedy tokens that transformers (with PEFT for an adapter) generates after PROMPT."""
    model = load_base(base_folder)
    if adapter_folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_folder).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        )
    return out[0, len(PROMPT):].tolist()
