"""PEFT adapter types, one module each, behind one lookup."""

from __future__ import annotations

from registry.adapters.base import AdapterMetadata, AdapterType
from registry.adapters.ia3 import IA3Type
from registry.adapters.lora import LoraType
from registry.adapters.other import CatalogOnlyType

_COMPOSABLE: dict[str, AdapterType] = {t.peft_type: t for t in (LoraType(), IA3Type())}


def adapter_type(peft_type: str) -> AdapterType:
    """The handler for a PEFT type; types without arithmetic here are catalogued only."""
    return _COMPOSABLE.get(peft_type) or CatalogOnlyType(peft_type)


__all__ = ["AdapterMetadata", "AdapterType", "adapter_type"]
