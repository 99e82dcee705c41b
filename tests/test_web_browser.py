"""The web view of `pem serve` in a real browser (issue 17): Debian's chromium driven by
Playwright, against a real `pem serve` process on 127.0.0.1 whose reads need a token.

What is compared with what: the rows the catalog shows against `pem list --json` run by the
real CLI on the server's registry (the same filters, the same search); the provenance shown
against coefficients worked out by hand from the expressions (SEMANTICS.md section 2); the
lineage and descendants against the graph the test built. Screenshots go to
test-artifacts/web/ (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from independent import make_numpy_lora

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
if not Path(CHROMIUM).exists():  # `make test` installs it; say how when it is missing
    pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (or run `make test`)", pytrace=False)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "web"
STARTUP_BOUND_S = 120  # a bound on waiting for start-up, not a timing assertion
PER_PAGE = 4  # small pages, so that the 13 modules span several
INJECTION = "<script>alert('x')</script>"
TAG_INJECTION = "<img src=x onerror=alert(1)>"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pem(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
    assert result.returncode == 0, f"pem {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def cli_refs(env: dict[str, str], *args: str) -> list[str]:
    return [m["ref"] for m in json.loads(pem("list", "--json", *args, env=env))]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A registry of 13 modules (10 trained, a derived chain mix <- mix2, a port-free graph),
    served by `pem serve` without --public-read; yields (url, token, env)."""
    root = tmp_path_factory.mktemp("web")
    env = {"PEM_HOME": str(root / "home"), "PEM_USER": "builder", "HF_ENDPOINT": "http://127.0.0.1:9"}
    pem("init", env=env)
    from registry import Registry

    with Registry.open(env["PEM_HOME"]) as registry:
        for i in range(10):
            registry.add(make_numpy_lora(root / f"a{i}", seed=i), f"team/a{i}", task="sentiment" if i % 2 else "summary",
                         tags={"lang": "en" if i < 5 else "de"}, description=f"adapter number {i}")
        registry.add(make_numpy_lora(root / "odd", seed=99), "lab/odd-one", task="qa", tags={"note": TAG_INJECTION},
                     description=INJECTION)
        registry.compose("0.5 * team/a0 + 0.25 * team/a1 - team/a2", "team/mix", description="a mixture")
        registry.compose("2 * team/mix + team/a3", "team/mix2")
        registry.set_alias("team/mix", "prod", 1)
    token = json.loads(pem("token", "create", "--user", "alice", "--role", "reader", "--json", env=env))["token"]
    port = free_port()
    log = open(root / "server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], cwd=ROOT,
                               stdout=log, stderr=log, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_BOUND_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.2)
    yield url, token, env
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, site):
    """A fresh browser context recording every request, console error and dialog; at the end
    of the test, every request stayed on 127.0.0.1 and nothing went wrong in the console."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    requests, problems = [], []
    context.on("request", lambda request: requests.append(request.url))
    tab = context.new_page()
    tab.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
           if message.type == "error" else None)
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("dialog", lambda dialog: (problems.append(f"a script ran: dialog {dialog.message!r}"), dialog.dismiss()))
    yield tab
    context.close()
    hosts = {urlparse(u).hostname for u in requests if not u.startswith(("data:", "about:"))}
    assert requests and hosts == {"127.0.0.1"}, f"requests left 127.0.0.1: {sorted(hosts)}"
    assert problems == []


def sign_in(page, url: str, token: str, path: str = "/") -> None:
    page.goto(url + path)
    assert urlparse(page.url).path == "/login"
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def catalog_refs(page) -> list[str]:
    return page.locator("table.catalog tbody th a.ref").all_inner_texts()


def all_pages(page) -> list[str]:
    """Every ref the catalog shows, following its Next links."""
    seen = catalog_refs(page)
    while page.locator("a[rel=next]").count():
        page.locator("a[rel=next]").click()
        page.wait_for_load_state()
        seen += catalog_refs(page)
    return seen


def test_catalog_lists_filters_and_searches_as_the_cli_does(page, site):
    url, token, env = site
    sign_in(page, url, token, f"/?per_page={PER_PAGE}")
    assert urlparse(page.url).query == f"per_page={PER_PAGE}"  # back where the login started
    page.screenshot(path=str(ARTIFACTS / "catalog.png"), full_page=True)
    everything = cli_refs(env)
    assert len(everything) == 13 and all_pages(page) == everything  # four pages, in the CLI's order

    page.goto(f"{url}/?per_page={PER_PAGE}")
    page.get_by_label("Task").fill("sentiment")
    page.get_by_label("Tag (KEY=VALUE)").fill("lang=en")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    assert all_pages(page) == cli_refs(env, "--task", "sentiment", "--tag", "lang=en") == ["team/a1@1", "team/a3@1"]

    page.goto(f"{url}/?per_page={PER_PAGE}")
    page.get_by_label("Search").fill("MIX")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    assert all_pages(page) == cli_refs(env, "--search", "MIX") == ["team/mix@1", "team/mix2@1"]
    remote = {"PEM_HOME": env["PEM_HOME"] + "-client", "PEM_REGISTRY_URL": url, "PEM_TOKEN": token}
    assert cli_refs(remote, "--search", "MIX") == ["team/mix@1", "team/mix2@1"]  # the same search through the server

    page.goto(f"{url}/?search=onerror")  # found through the tag value, shown as text
    assert catalog_refs(page) == cli_refs(env, "--search", "onerror") == ["lab/odd-one@1"]
    assert page.locator("table.catalog .tag").first.inner_text() == f"note={TAG_INJECTION}"

    page.goto(f"{url}/?kind=derived&sort=created&desc=1")
    assert catalog_refs(page) == ["team/mix2@1", "team/mix@1"]
    page.get_by_role("link", name="Module").click()  # sort by name, ascending
    page.wait_for_load_state()
    assert catalog_refs(page) == cli_refs(env, "--kind", "derived") == ["team/mix@1", "team/mix2@1"]


def test_click_through_provenance_lineage_descendants_and_logout(page, site):
    url, token, env = site
    sign_in(page, url, token, "/?kind=derived")
    page.get_by_role("link", name="team/mix2@1").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "team/mix2@1"
    page.locator("table.inputs").get_by_role("link", name="team/mix@1").click()
    page.wait_for_load_state()
    assert urlparse(page.url).path == "/modules/team/mix@1"
    page.screenshot(path=str(ARTIFACTS / "module.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "module-top.png"), clip={"x": 0, "y": 0, "width": 1100, "height": 1180})

    assert page.locator("code.expression").inner_text() == "0.5 * team/a0 + 0.25 * team/a1 - team/a2"
    canonical = page.locator("code.canonical").inner_text()
    assert all(ref in canonical for ref in ("team/a0@1", "team/a1@1", "team/a2@1"))
    rows = [r.locator("th, td").all_inner_texts()[:3] for r in page.locator("table.inputs tbody tr").all()]
    # by hand (SEMANTICS.md section 2): a = |c|, b = c for each term
    assert sorted(rows) == [["team/a0@1", "0.5", "0.5"], ["team/a1@1", "0.25", "0.25"], ["team/a2@1", "1", "-1"]]

    graph_refs = set(page.locator("svg g.node").evaluate_all("nodes => nodes.map(n => n.dataset.ref)"))
    assert graph_refs == {"team/mix@1", "team/a0@1", "team/a1@1", "team/a2@1"}
    labels = page.locator("svg g.edge text").evaluate_all("texts => texts.map(t => t.textContent)")
    assert sorted(labels) == ["module 0.25", "module 0.5", "module a=1 b=-1"]  # method, coefficient
    assert [r for r in page.locator("table.descendants tbody th").all_inner_texts()] == ["team/mix2@1"]

    page.locator("table.inputs").get_by_role("link", name="team/a0@1").click()  # on to an input
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "team/a0@1"
    assert page.locator("table.descendants tbody th").all_inner_texts() == ["team/mix@1", "team/mix2@1"]

    page.goto(f"{url}/modules/team/mix2@1")  # the SVG names every ancestor, links each of them
    nodes = page.locator("svg g.node")
    assert set(nodes.evaluate_all("nodes => nodes.map(n => n.dataset.ref)")) == {
        "team/mix2@1", "team/mix@1", "team/a0@1", "team/a1@1", "team/a2@1", "team/a3@1"}
    page.locator("svg g.node[data-ref='team/a3@1'] a").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "team/a3@1"

    page.goto(f"{url}/modules/team/mix@prod")  # alias, digest and version URLs name the same page
    assert page.locator("h1").inner_text() == "team/mix@1"
    assert page.get_by_label("Export with the CLI").input_value() == f"PEM_REGISTRY_URL={url} pem export team/mix@1 ./team-mix-1"

    page.goto(f"{url}/modules/lab/odd-one")
    assert page.locator("p.description").inner_text() == INJECTION  # shown as text; no dialog (checked at teardown)

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    assert urlparse(page.url).path == "/login"
    page.goto(f"{url}/modules/team/mix@1")
    assert urlparse(page.url).path == "/login"
