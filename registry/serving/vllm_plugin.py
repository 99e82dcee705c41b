"""A vLLM LoRA resolver that serves registry references, pinned by digest, following alias moves.

vLLM loads :func:`register` from the entry-point group ``vllm.general_plugins`` in each of its
processes. It is the only module of the package that imports vLLM (vLLM is the one importing it);
the registry side lives in :mod:`registry.serving.pinning` and :mod:`registry.serving.watcher`.

How vLLM 0.32 uses a resolver (``vllm/entrypoints/openai/models/serving.py``, ``resolve_lora``):
a request whose ``model`` is neither the base model nor a loaded adapter is passed to each
resolver as ``(--model value, requested name)``; the first ``LoRARequest`` returned is loaded
and cached under the requested name, and vLLM never asks again about that name until it is
unloaded (``POST /v1/unload_lora_adapter``). So:

* every reference is pinned to a digest, and the returned path is that digest's folder
  (:mod:`registry.serving.pinning`): one name reloaded with other weights never shares a path
  with them, which also keeps vLLM's prefix cache honest (vllm#42125);
* names that can move (``NS/NAME@ALIAS``, ``NS/NAME``) are re-resolved by a watcher thread
  every ``PEM_VLLM_POLL_SECONDS``; when one points at another digest, the watcher unloads the
  name through vLLM's own ``/v1/unload_lora_adapter``. Unloading only forgets the name: requests
  already running keep their adapter, and the next request resolves the name again.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
from typing import Any

from registry.config import ENV_DATABASE_URL, ENV_HOME, ENV_REGISTRY_URL, ServingSettings
from registry.errors import ConfigurationError
from registry.serving.pinning import Pinned, Pinner, Refusal
from registry.serving.watcher import AliasWatcher, Unloader, own_api_key, own_server_url

RESOLVER_NAME = "pem-registry"


def _logger() -> Any:
    from vllm.logger import init_logger

    return init_logger("vllm.pem_registry")  # under "vllm", so it goes to vLLM's own log handler


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver, or say why not.

    vLLM calls it in each of its processes; only the API server (the main process) resolves,
    so only it speaks, once."""
    try:
        settings = ServingSettings.from_environment()
    except ConfigurationError as exc:
        _say(logging.WARNING, f"pem: resolver not registered: {exc}")
        return
    if settings.registry_named is None:
        _say(logging.INFO, (
            f"pem: resolver not registered: set {ENV_HOME}, {ENV_DATABASE_URL} or {ENV_REGISTRY_URL} to name "
            "the registry to serve from (the default home is never used)"
        ))
        return
    if os.environ.get(ENV_REGISTRY_URL) and not _registry_accepts_url():
        _say(logging.WARNING, (
            f"pem: resolver not registered: {ENV_REGISTRY_URL} needs a pem-registry with the remote client; "
            f"set {ENV_HOME} or {ENV_DATABASE_URL} instead"
        ))
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, RegistryResolver(settings))
    _say(logging.INFO, f"pem: resolver registered (registry named by {settings.registry_named}, cache {settings.cache})")


def _say(level: int, message: str) -> None:
    """Log from the main process only. vLLM loads plugins there before it configures logging
    (in ``EngineArgs``), when an INFO record would be dropped: then write to stderr."""
    if multiprocessing.parent_process() is not None:
        return
    logger = _logger()
    if logger.hasHandlers():
        logger.log(level, "%s", message)
    else:
        print(f"{logging.getLevelName(level)} {message}", file=sys.stderr, flush=True)


def _registry_accepts_url() -> bool:
    """Whether ``Registry.open`` can use PEM_REGISTRY_URL (the remote client of `pem serve`)."""
    import importlib.util

    return importlib.util.find_spec("registry.remote") is not None


def _open_registry() -> Any:
    from registry import Registry

    return Registry.open()  # PEM_HOME / PEM_DATABASE_URL (/ PEM_REGISTRY_URL) from the environment


def _resolver_base() -> type:
    from vllm.lora.resolver import LoRAResolver

    return LoRAResolver


class RegistryResolver(_resolver_base()):  # type: ignore[misc]
    """Pins each requested reference to a digest; refusals return None (vLLM answers 404)."""

    def __init__(self, settings: ServingSettings):
        self.settings = settings
        self.pinner = Pinner(settings, _open_registry)
        self.logger = _logger()
        self.watcher: AliasWatcher | None = None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        from vllm.lora.request import LoRARequest

        try:
            pinned = await asyncio.to_thread(self.pinner.pin, lora_name, base_model_name)
        except Refusal as refusal:
            self.logger.warning("pem: refused %s: %s", lora_name, refusal)
            return None
        self.logger.info("%s", pinned.log_line())
        if pinned.movable:
            self._watch(pinned)
        # vLLM replaces lora_int_id with its own counter; it must only be positive here.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(pinned.folder))

    def _watch(self, pinned: Pinned) -> None:
        if self.watcher is None:
            self.watcher = AliasWatcher(self.pinner, self.settings.poll_seconds, self._unloader(), self.logger)
            self.watcher.start()
        self.watcher.track(pinned.requested, pinned.digest)

    def _unloader(self) -> Unloader:
        return Unloader(self.settings.server_url or own_server_url(sys.argv), own_api_key(sys.argv))
