"""(IA)^3: catalog metadata (catalog.py) and arithmetic (compute.py, imports torch)."""

from registry.adapters.ia3.catalog import IA3Type

__all__ = ["IA3Type"]
