"""LoRA: catalog metadata (catalog.py) and arithmetic (compute.py, imports torch)."""

from registry.adapters.lora.catalog import LoraType

__all__ = ["LoraType"]
