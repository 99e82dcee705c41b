"""The alias watcher of the vLLM plugin (registry.serving.watcher), without vLLM: it unloads a
loaded name through ``POST /v1/unload_lora_adapter`` when the name moves, and only then; an
unreachable registry leaves loaded names serving. The vLLM side is an HTTP endpoint that
records what it is sent (the real vLLM is exercised in test_vllm_serving.py)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import make_lora
from registry import Registry
from registry.config import ServingSettings
from registry.serving.pinning import Pinner
from registry.serving.watcher import AliasWatcher, Unloader, own_api_key, own_server_url


class UnloadEndpoint:
    """Answers POST /v1/unload_lora_adapter with ``status`` and records each request."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[str, dict, str | None]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.received.append((self.path, body, self.headers.get("Authorization")))
                self.send_response(endpoint.status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> list[str]:
        return [body["lora_name"] for _, body, _ in self.received]


@pytest.fixture
def endpoint():
    served = UnloadEndpoint()
    yield served
    served.server.shutdown()


@pytest.fixture
def moves(registry, tmp_path):
    registry.add(make_lora(tmp_path / "x1", seed=1), "team/x")
    registry.add(make_lora(tmp_path / "x2", seed=2), "team/x")
    registry.set_alias("team/x", "prod", 1)
    return registry


def watcher_for(open_registry, endpoint, tmp_path, api_key=None) -> AliasWatcher:
    settings = ServingSettings(registry_named="PEM_HOME", base_model=None, namespaces=None,
                               cache=tmp_path / "served", poll_seconds=1.0, server_url=endpoint.url)
    return AliasWatcher(Pinner(settings, open_registry), 1.0, Unloader(endpoint.url, api_key),
                        logging.getLogger("test.pem.watcher"))


def reopen(registry):
    return lambda: Registry.open(registry.settings.home, database_url=registry.settings.database_url)


def test_a_moved_alias_is_unloaded_once_and_forgotten(moves, endpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="test.pem.watcher")
    v1, v2 = moves.resolve("team/x@1").digest, moves.resolve("team/x@2").digest
    watcher = watcher_for(reopen(moves), endpoint, tmp_path, api_key="k3y")
    watcher.track("team/x@prod", v1)
    watcher.poll_once()
    assert endpoint.received == []  # nothing moved
    moves.set_alias("team/x", "prod", 2)
    watcher.poll_once()
    assert endpoint.received == [("/v1/unload_lora_adapter", {"lora_name": "team/x@prod"}, "Bearer k3y")]
    assert f"pem: team/x@prod moved from sha256:{v1} to sha256:{v2}" in caplog.text
    assert watcher.tracked() == {}
    watcher.poll_once()
    assert len(endpoint.received) == 1
    watcher.pinner.close()


def test_a_removed_alias_is_unloaded_so_the_next_request_is_refused(moves, endpoint, tmp_path):
    watcher = watcher_for(reopen(moves), endpoint, tmp_path)
    watcher.track("team/x@prod", moves.resolve("team/x@1").digest)
    moves.remove_alias("team/x", "prod")
    watcher.poll_once()
    assert endpoint.names() == ["team/x@prod"] and watcher.tracked() == {}
    watcher.pinner.close()


def test_a_failed_unload_is_retried_and_a_404_means_already_gone(moves, endpoint, tmp_path):
    watcher = watcher_for(reopen(moves), endpoint, tmp_path)
    watcher.track("team/x@prod", moves.resolve("team/x@1").digest)
    moves.set_alias("team/x", "prod", 2)
    endpoint.status = 500
    watcher.poll_once()
    assert watcher.tracked() == {"team/x@prod": moves.resolve("team/x@1").digest}
    endpoint.status = 404  # vLLM no longer has the name (it never loaded, or someone unloaded it)
    watcher.poll_once()
    assert endpoint.names() == ["team/x@prod", "team/x@prod"] and watcher.tracked() == {}
    watcher.pinner.close()


def test_a_newer_resolution_is_not_forgotten_by_an_older_move(moves, endpoint, tmp_path):
    """The name was re-resolved (to the new digest) between the poll and the unload's answer."""
    v1, v2 = moves.resolve("team/x@1").digest, moves.resolve("team/x@2").digest
    watcher = watcher_for(reopen(moves), endpoint, tmp_path)
    watcher.track("team/x@prod", v1)
    moves.set_alias("team/x", "prod", 2)
    original = watcher.unloader.unload

    def unload_then_resolve_again(name):
        answer = original(name)
        watcher.track(name, v2)
        return answer

    watcher.unloader.unload = unload_then_resolve_again
    watcher.poll_once()
    assert watcher.tracked() == {"team/x@prod": v2}
    watcher.pinner.close()


def test_an_unreachable_registry_keeps_loaded_names_and_says_so_once(endpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="test.pem.watcher")
    home = tmp_path / "later"
    watcher = watcher_for(lambda: Registry.open(home), endpoint, tmp_path)
    watcher.track("team/x@prod", "0" * 64)
    for _ in range(3):
        watcher.poll_once()
    assert endpoint.received == [] and watcher.tracked() == {"team/x@prod": "0" * 64}
    assert caplog.text.count("cannot re-check loaded names, they keep serving: registry unreachable") == 1
    Registry.init(home).close()  # reachable again, and team/x@prod now names nothing: unloaded
    watcher.poll_once()
    assert "registry reachable again" in caplog.text and endpoint.names() == ["team/x@prod"]
    watcher.pinner.close()


def test_the_server_address_and_key_come_from_vllms_command_line(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert own_server_url(["serve", "m", "--host", "0.0.0.0", "--port", "9001"]) == "http://127.0.0.1:9001"
    assert own_server_url(["--port=7", "--host=10.0.0.5"]) == "http://10.0.0.5:7"
    assert own_server_url(["--host", "::1"]) == "http://[::1]:8000"
    assert own_api_key(["--api-key", "abc"]) == "abc" and own_api_key([]) is None
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert own_api_key([]) == "from-env"
