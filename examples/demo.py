"""The pem-registry demo: register, compose, inspect, export, on a fresh SQLite registry.

Run it with `make demo`. It trains nothing and downloads nothing: it builds a tiny Llama-style
model from a config, makes three LoRA adapters and two (IA)^3 adapters with PEFT (random
weights standing in for fine-tuned ones), then drives the `pem` command exactly as a user
would, printing each command before its output. The registry lives in ./demo-registry and
is recreated on each run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# The demo never needs the network: PEFT's save_pretrained would otherwise try to fetch the
# made-up base model's config from the Hub and print a warning.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "demo-registry"
PEM = Path(sys.executable).with_name("pem")
BASE_MODEL = "demo-org/tiny-llama"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = model.config._name_or_path = BASE_MODEL
    return model


def save_adapter(folder: Path, peft_config, seed: int, center: float) -> Path:
    """An adapter as PEFT saves it, with seeded random weights in place of training."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), peft_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                param.copy_(center + 0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def pem(*args: str, check: bool = True) -> None:
    print(f"\n$ pem {' '.join(a if ' ' not in a else repr(a) for a in args)}", flush=True)
    result = subprocess.run([str(PEM), *args], env={**os.environ, "PEM_HOME": str(WORK / "home")})
    if check and result.returncode != 0:
        sys.exit(f"demo failed at: pem {' '.join(args)}")


def main() -> None:
    from peft import IA3Config, LoraConfig

    shutil.rmtree(WORK, ignore_errors=True)
    adapters = WORK / "adapters"
    print("Building adapters with PEFT on a tiny Llama-style model (from a config, no download)...")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    save_adapter(adapters / "yelp", LoraConfig(**lora), seed=1, center=0.0)
    save_adapter(adapters / "amazon", LoraConfig(**lora), seed=2, center=0.0)
    save_adapter(adapters / "toxic", LoraConfig(**lora), seed=3, center=0.0)
    ia3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    save_adapter(adapters / "ia3-news", IA3Config(**ia3), seed=4, center=1.0)
    save_adapter(adapters / "ia3-sports", IA3Config(**ia3), seed=5, center=1.0)

    pem("init")
    pem("add", str(adapters / "yelp"), "--name", "team/yelp", "--task", "sentiment", "--tag", "domain=reviews")
    pem("add", str(adapters / "amazon"), "--name", "team/amazon", "--task", "sentiment", "--tag", "domain=shopping")
    pem("add", str(adapters / "toxic"), "--name", "team/toxic", "--task", "toxicity")
    pem("add", str(adapters / "ia3-news"), "--name", "team/ia3-news", "--task", "topic")
    pem("add", str(adapters / "ia3-sports"), "--name", "team/ia3-sports", "--task", "topic")
    pem("add", str(adapters / "yelp"), "--name", "team/yelp")  # same content: no new version
    pem("list")
    pem("list", "--task", "sentiment", "--peft-type", "lora")
    pem("show", "team/yelp")

    print("\nComposition is checked on metadata before any tensor is read:")
    pem("check", "0.5*team/yelp + 0.5*team/amazon - 0.3*team/toxic")
    pem("check", "team/yelp + team/ia3-news", check=False)
    pem("check", "team/yelp * team/amazon", check=False)
    pem("check", "0.5*team/yelp + 0.5*team/amazon", "--deviation")

    pem("compose", "0.5*team/yelp + 0.5*team/amazon - 0.3*team/toxic", "--name", "team/sentiment-detox")
    pem("compose", "0.5*team/yelp + 0.5*team/amazon - 0.3*team/toxic", "--name", "team/sentiment-detox-exact",
        "--method", "exact")
    pem("compose", "team/ia3-news - 0.5*team/ia3-sports", "--name", "team/news-not-sports")
    pem("list", "--kind", "derived")
    pem("show", "team/sentiment-detox")

    print("\nProvenance: what is it made of, what was built from that, can we rebuild it?")
    pem("compose", "team/sentiment-detox - 0.2*team/yelp", "--name", "team/less-yelp", "--method", "exact")
    pem("lineage", "team/less-yelp")
    pem("lineage", "team/less-yelp", "--format", "mermaid")
    pem("contents", "team/less-yelp")
    pem("descendants", "team/yelp")
    pem("verify", "--all")

    print("\nPorting to another host of the same architecture (Sabry & Belz, 2024):")
    hosts = WORK / "hosts"
    for host_id, vocab in ((BASE_MODEL, 128), ("demo-org/tiny-llama-v2", 128)):
        config = tiny_llama().config
        config.architectures = ["LlamaForCausalLM"]
        config.vocab_size = vocab
        config.save_pretrained(hosts / host_id.replace("/", "--"))
        pem("base", "add", host_id, "--config", str(hosts / host_id.replace("/", "--") / "config.json"))
    pem("port", "team/toxic", "--to", "demo-org/tiny-llama-v2", "--dry-run")
    pem("port", "team/toxic", "--to", "demo-org/tiny-llama-v2", "--name", "team/toxic-v2")
    pem("lineage", "team/toxic-v2")

    export_dir = WORK / "export" / "sentiment-detox"
    pem("export", "team/sentiment-detox", str(export_dir))
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), export_dir)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    print(f"\nLoaded {export_dir.name} with PeftModel.from_pretrained: logits shape {tuple(logits.shape)}")
    print(f"\nDone. The registry is in {WORK / 'home'}; try `PEM_HOME={WORK / 'home'} {PEM} list`.")


if __name__ == "__main__":
    main()
