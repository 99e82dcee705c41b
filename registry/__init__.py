"""pem-registry: a catalog of parameter-efficient modules (PEFT adapters), their composition
and their provenance.

``from registry import Registry`` is the entry point; see :mod:`registry.api`. Importing this
package is cheap: nothing here imports torch, and the API is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from registry.api import Registry

__all__ = ["Registry", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from registry.api import Registry

        return Registry
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
