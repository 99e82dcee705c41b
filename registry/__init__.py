"""pem-registry: a catalog of parameter-efficient modules (PEFT adapters), their composition
and their provenance.

``from registry import Registry`` is the entry point; see :mod:`registry.api`. Importing this
package is cheap: nothing here imports torch, and the API is loaded on first use.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from registry.api import Registry

__all__ = ["Registry", "__version__"]


def lazy_module(name: str) -> ModuleType:
    """The module ``name``, executed on its first attribute access: ``hub = lazy_module(
    "registry.hub")`` at the top of a module costs nothing for the commands that never use it
    (start-up of `pem list` and `pem show`; bench/startup.py)."""
    if name in sys.modules:
        return sys.modules[name]
    import importlib.util

    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
    return module


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from registry.api import Registry

        return Registry
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
