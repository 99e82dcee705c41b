"""PEFT types the registry catalogs but cannot compose (LoHa, LoKr, prefix and prompt
tuning, AdaLoRA, ...): metadata is what the config says; tensors are listed as they are."""

from __future__ import annotations

from typing import Any

from registry.adapters.base import MAX_RANK, AdapterMetadata, AdapterType, common_dtype, target_modules_list
from registry.errors import InvalidAdapterError
from registry.safetensors_io import SafetensorsHeader


class CatalogOnlyType(AdapterType):
    composable = False

    def __init__(self, peft_type: str):
        self.peft_type = peft_type

    def describe(self, config: dict[str, Any], header: SafetensorsHeader) -> AdapterMetadata:
        rank = config.get("r")
        if isinstance(rank, int) and not isinstance(rank, bool) and not 0 < rank <= MAX_RANK:
            raise InvalidAdapterError(f"adapter_config.json: r must be an integer from 1 to {MAX_RANK}, got {rank!r}")
        return AdapterMetadata(
            peft_type=self.peft_type,
            composable=False,
            base_model=config.get("base_model_name_or_path"),
            base_revision=config.get("revision"),
            task_type=config.get("task_type"),
            rank=rank if isinstance(rank, int) and not isinstance(rank, bool) and 0 < rank <= MAX_RANK else None,
            lora_alpha=None,
            use_rslora=False,
            use_dora=False,
            target_modules=target_modules_list(config) if isinstance(config.get("target_modules"), (str, list)) else [],
            layers={name: {"params": {"tensor": list(info.shape)}} for name, info in header.tensors.items()},
            dtype=common_dtype(header),
            num_parameters=sum(t.numel for t in header.tensors.values()),
            unsupported=[f"PEFT type {self.peft_type}"],
        )
