"""Keeping vLLM in step with alias moves: a watcher thread that re-resolves the movable names
vLLM has loaded and unloads those that moved, through vLLM's own ``/v1/unload_lora_adapter``.
No vLLM import: the plugin (:mod:`registry.serving.vllm_plugin`) hands it a logger."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from registry.serving.pinning import Pinner, Refusal

UNLOAD_TIMEOUT_SECONDS = 10


class Unloader:
    """``POST /v1/unload_lora_adapter`` on this vLLM server (vLLM's own way to forget a name)."""

    def __init__(self, server_url: str, api_key: str | None):
        self.server_url = server_url
        self.api_key = api_key

    def unload(self, lora_name: str) -> tuple[bool, str]:
        """(whether vLLM no longer has the name, what it said)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            f"{self.server_url}/v1/unload_lora_adapter", data=json.dumps({"lora_name": lora_name}).encode(),
            headers=headers, method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=UNLOAD_TIMEOUT_SECONDS) as answer:
                return True, answer.read().decode(errors="replace")[:200]
        except urllib.error.HTTPError as exc:
            return exc.code == 404, f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:200]}"
        except OSError as exc:
            return False, str(exc)


class AliasWatcher(threading.Thread):
    """Re-resolves the movable names vLLM has loaded; unloads those that moved."""

    def __init__(self, pinner: Pinner, poll_seconds: float, unloader: Unloader, logger: Any):
        super().__init__(name="pem-alias-watcher", daemon=True)
        self.pinner = pinner
        self.poll_seconds = poll_seconds
        self.unloader = unloader
        self.logger = logger
        self._tracked: dict[str, str] = {}  # requested name -> digest it was loaded with
        self._lock = threading.Lock()
        self._registry_failing = False

    def track(self, name: str, digest: str) -> None:
        with self._lock:
            self._tracked[name] = digest

    def tracked(self) -> dict[str, str]:
        with self._lock:
            return dict(self._tracked)

    def run(self) -> None:
        while True:
            time.sleep(self.poll_seconds)
            self.poll_once()

    def poll_once(self) -> None:
        for name, loaded in self.tracked().items():
            self._check(name, loaded)

    def _check(self, name: str, loaded: str) -> None:
        try:
            current = self.pinner.current_digest(name)
        except Refusal as refusal:
            if not self._registry_failing:  # one line per outage, not one per poll
                self.logger.warning("pem: cannot re-check loaded names, they keep serving: %s", refusal)
            self._registry_failing = True
            return
        if self._registry_failing:
            self.logger.info("pem: registry reachable again; re-checking loaded names")
            self._registry_failing = False
        if current == loaded:
            return
        now = f"sha256:{current}" if current else "nothing"
        forgotten, answer = self.unloader.unload(name)
        if not forgotten:
            self.logger.warning("pem: %s now points at %s but unloading it failed (%s); retrying", name, now, answer)
            return
        with self._lock:
            if self._tracked.get(name) == loaded:  # a new resolution may have replaced it meanwhile
                del self._tracked[name]
        self.logger.info("pem: %s moved from sha256:%s to %s: unloaded, the next request loads it", name, loaded, now)


def own_server_url(argv: list[str]) -> str:
    """This vLLM server's address, from its command line (``--host``, ``--port``)."""
    host = _option(argv, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{_option(argv, '--port') or '8000'}"


def own_api_key(argv: list[str]) -> str | None:
    return _option(argv, "--api-key") or os.environ.get("VLLM_API_KEY") or None


def _option(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
