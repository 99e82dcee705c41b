"""The web view over HTTP, in-process, on SQLite and PostgreSQL (issue 17): the search shared
by `pem list --search` and the catalog, sorting and offsets, bad query parameters, sessions
(cookie flags, CSRF, logout on every replica, revoked tokens) and the archive download.

Expected rows are worked out by hand from the modules each test adds."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import pytest
from independent import make_numpy_lora
from sqlalchemy import select

from registry import Registry
from registry.db.models import WebSession
from registry.errors import InvalidNameError
from registry.server.app import ServerOptions, create_app
from registry.server.tokens import create_token, revoke_token

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

INJECTION = "<script>alert(1)</script>"


@pytest.fixture
def catalog(registry: Registry, tmp_path: Path) -> Registry:
    """team/alpha (sentiment, lang=en), team/beta (qa, lang=de, description with 'needle'),
    lab/gamma_x (summary, note=50%), and team/mix = team/alpha + team/beta (exact: rank 4 + 8)."""
    registry.add(make_numpy_lora(tmp_path / "a", seed=1, r=4), "team/alpha", task="sentiment", tags={"lang": "en"})
    registry.add(make_numpy_lora(tmp_path / "b", seed=2, r=8), "team/beta", task="qa", tags={"lang": "de"},
                 description="finds the Needle in a haystack")
    registry.add(make_numpy_lora(tmp_path / "c", seed=3, r=2), "lab/gamma_x", task="summary", tags={"note": "50%"})
    registry.compose("team/alpha + team/beta", "team/mix", method="exact")
    return registry


def refs(modules) -> list[str]:
    return [m.ref for m in modules]


def test_search_covers_names_tasks_tags_and_descriptions(catalog: Registry):
    assert refs(catalog.list(search="ALPHA")) == ["team/alpha@1"]  # name, any case
    assert refs(catalog.list(search="team/")) == ["team/alpha@1", "team/beta@1", "team/mix@1"]
    assert refs(catalog.list(search="sentim")) == ["team/alpha@1"]  # task
    assert refs(catalog.list(search="lang=de")) == ["team/beta@1"]  # tag as KEY=VALUE
    assert refs(catalog.list(search="needle")) == ["team/beta@1"]  # description
    assert refs(catalog.list(search="50%")) == ["lab/gamma_x@1"]  # % is a character, not a wildcard
    assert refs(catalog.list(search="a_x")) == ["lab/gamma_x@1"]  # so is _
    assert refs(catalog.list(search="%")) == ["lab/gamma_x@1"]
    assert refs(catalog.list(search="team", task="qa")) == ["team/beta@1"]  # with the other filters
    assert catalog.list(search="nothing like it") == []


def test_sort_offset_and_limit_page_through_the_same_rows(catalog: Registry):
    by_rank = ["team/mix@1", "team/beta@1", "team/alpha@1", "lab/gamma_x@1"]  # r 12 (stacked), 8, 4, 2
    assert refs(catalog.list(sort="rank", descending=True)) == by_rank
    assert refs(catalog.list(sort="rank", descending=True, offset=1, limit=2)) == by_rank[1:3]
    assert refs(catalog.list(offset=3)) == ["team/mix@1"]
    assert refs(catalog.list(offset=10)) == []
    with pytest.raises(InvalidNameError, match="cannot sort by 'owner'"):
        catalog.list(sort="owner")


def test_pem_list_search(catalog: Registry, run_pem):
    result = run_pem("list", "--search", "NEEDLE", "--json")
    assert result.exit_code == 0 and [m["ref"] for m in json.loads(result.output)] == ["team/beta@1"]
    result = run_pem("list", "--search", "x" * 300)
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith("error:") and "Traceback" not in result.output


def public(registry: Registry, **options) -> TestClient:
    return TestClient(create_app(registry, ServerOptions(public_read=True, **options)))


def test_catalog_page_shows_the_apis_rows_and_escapes_what_users_wrote(catalog: Registry):
    catalog.describe("lab/gamma_x", INJECTION)
    catalog.tag("team/alpha", {"evil": INJECTION})
    client = public(catalog)
    page = client.get("/", params={"per_page": 2, "page": 2})
    assert page.status_code == 200
    assert re.findall(r'class="ref" href="[^"]+">([^<]+)<', page.text) == ["team/beta@1", "team/mix@1"]
    assert "text/html" in page.headers["content-type"] and "default-src 'self'" in page.headers["content-security-policy"]
    for where in ({"search": INJECTION}, {"tag": f"evil={INJECTION}"}):
        page = client.get("/", params=where)
        assert page.status_code == 200 and "<script>alert" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    module = client.get("/modules/lab/gamma_x")
    assert module.status_code == 200 and "<script>alert" not in module.text and "&lt;script&gt;" in module.text


@pytest.mark.parametrize("query, status, says", [
    ("bogus=1", 422, "unknown filter &#39;bogus&#39;"),
    ("page=1000000000000", 422, "page is a whole number from 1 to 1,000,000"),
    ("page=-1", 422, "page is a whole number"),
    ("per_page=abc", 422, "per_page is a whole number"),
    ("rank=%3Cb%3E", 422, "rank is a whole number"),
    ("kind=%3Cscript%3E", 422, "unknown kind &#39;&lt;script&gt;&#39;"),
    ("sort=owner", 422, "cannot sort by &#39;owner&#39;"),
    ("tag=novalue", 400, "invalid tag &#39;novalue&#39;"),
    ("task=a&task=b", 422, "task is given 2 times"),
    ("search=" + "x" * 300, 400, "a search is at most 256 characters"),
    ("derived_from=team/nope", 404, "no module named team/nope"),
])
def test_bad_query_parameters_get_a_4xx_page_never_a_trace(catalog: Registry, query: str, status: int, says: str):
    page = public(catalog).get("/?" + query)
    assert (page.status_code, "text/html" in page.headers["content-type"]) == (status, True)
    assert says in page.text and "Traceback" not in page.text


def test_module_urls_by_name_version_alias_and_digest(catalog: Registry):
    catalog.set_alias("team/mix", "prod", 1)
    client = public(catalog)
    digest = catalog.resolve("team/mix").digest
    for ref in ("team/mix", "team/mix@1", "team/mix@prod", f"sha256:{digest[:16]}"):
        page = client.get(f"/modules/{ref}")
        assert page.status_code == 200 and "<h1>team/mix@1</h1>" in page.text, ref
    missing = client.get("/modules/team/mxi")
    assert missing.status_code == 404 and "did you mean team/mix" in missing.text


def test_download_is_the_exported_folder_and_refuses_a_damaged_blob(catalog: Registry, tmp_path: Path):
    client = public(catalog)
    answer = client.get("/download/team/mix@1")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    exported = catalog.export("team/mix@1", tmp_path / "exported")
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        for name in archive.namelist():
            assert archive.read(name) == (exported / name).read_bytes()
    digest = catalog.resolve("team/alpha").digest
    blob = catalog.store.local_path(digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of a tensor
    blob.write_bytes(bytes(data))
    damaged = client.get("/download/team/alpha")
    assert damaged.status_code == 503 and "is corrupt: sha256 mismatch" in damaged.text and "text/html" in damaged.headers["content-type"]


def sign_in(client: TestClient, token: str, **headers: str):
    form = client.get("/login", headers=headers)
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    client.cookies.clear()  # sent by hand: a Secure cookie would not go back over the test's plain http
    return client.post("/login", data={"token": token, "csrf": csrf, "next": "/modules/team/alpha"},
                       headers={**headers, "Cookie": f"pem_csrf={form.cookies['pem_csrf']}"}, follow_redirects=False)


def test_login_sessions_are_server_side_and_logout_ends_them_on_every_replica(catalog: Registry):
    token = create_token(catalog, "alice", "reader").token
    replica_registry = Registry.open(catalog.settings.home, database_url=catalog.settings.database_url)
    first = TestClient(create_app(catalog, ServerOptions()))
    second = TestClient(create_app(replica_registry, ServerOptions()))
    try:
        assert first.get("/", follow_redirects=False).headers["location"] == "/login?next=%2F"
        assert first.get("/api/v1/modules").status_code == 401  # the API still wants a token
        assert first.get("/static/style.css").status_code == 200  # open, as the login page
        signed = sign_in(first, token)
        assert (signed.status_code, signed.headers["location"]) == (303, "/modules/team/alpha")
        cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("pem_session="))
        session_id = cookie.split(";")[0].split("=", 1)[1]
        flags = [part.strip().lower() for part in cookie.split(";")]
        assert "httponly" in flags and "samesite=lax" in flags and "secure" not in flags  # plain http
        assert any(f.startswith("expires=") for f in flags) and token not in cookie
        with catalog._session() as session:
            stored = session.scalars(select(WebSession.session_sha256)).all()
        assert stored == [hashlib.sha256(session_id.encode()).hexdigest()]  # only its hash

        second.cookies.set("pem_session", session_id)  # the other replica knows the session
        assert second.get("/modules/team/alpha").status_code == 200
        page = first.get("/")
        assert "Signed in as <strong>alice</strong>" in page.text
        logout_csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        forged = first.post("/logout", data={"csrf": "guess"}, follow_redirects=False)
        assert forged.status_code == 403 and second.get("/", follow_redirects=False).status_code == 200
        assert first.post("/logout", data={"csrf": logout_csrf}, follow_redirects=False).status_code == 303
        assert second.get("/", follow_redirects=False).status_code == 303  # ended everywhere
    finally:
        replica_registry.close()


def test_login_refuses_forged_forms_bad_tokens_and_foreign_next_pages(catalog: Registry):
    token = create_token(catalog, "bob", "reader")
    client = TestClient(create_app(catalog, ServerOptions()))
    no_form = client.post("/login", data={"token": token.token, "csrf": "x"}, follow_redirects=False)
    assert no_form.status_code == 403 and "pem_session" not in no_form.headers.get("set-cookie", "")
    wrong = sign_in(client, "pem_not-a-token")
    assert wrong.status_code == 401 and "unknown token" in wrong.text
    form = client.get("/login", params={"next": "//evil.example/steal"})
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    answer = client.post("/login", data={"token": token.token, "csrf": csrf, "next": "//evil.example/steal"},
                         follow_redirects=False)
    assert answer.headers["location"] == "/"
    assert client.get("/", follow_redirects=False).status_code == 200
    revoke_token(catalog, token.id)  # revoking the token ends its sessions
    assert client.get("/", follow_redirects=False).status_code == 303


def test_secure_cookie_behind_a_trusted_proxy_only(catalog: Registry):
    token = create_token(catalog, "carol", "reader").token
    https = {"X-Forwarded-Proto": "https"}
    trusted = sign_in(TestClient(create_app(catalog, ServerOptions(trust_proxy=True))), token, **https)
    untrusted = sign_in(TestClient(create_app(catalog, ServerOptions())), token, **https)
    direct = sign_in(TestClient(create_app(catalog, ServerOptions()), base_url="https://testserver"), token)
    for answer, secure in ((trusted, True), (untrusted, False), (direct, True)):
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("pem_session="))
        assert ("secure" in [p.strip().lower() for p in cookie.split(";")]) is secure


def test_lineage_layout_puts_inputs_above_what_was_made_from_them_and_marks_the_hub():
    from registry.schemas import Lineage, LineageEdge, LineageNode
    from registry.server.web.graph import ROW_GAP, NODE_HEIGHT, layout

    def node(ref: str, kind: str) -> LineageNode:
        return LineageNode(ref=ref, digest="0" * 64, kind=kind, peft_type="LORA", method=None, expression=None)

    # top <- mid <- base, and top <- base directly: base sits above mid (its longest path)
    lineage = Lineage(root="t/top@1", nodes=[node("t/top@1", "derived"), node("t/mid@1", "derived"),
                                             node("t/base@1", "pulled"), node("hf/repo:x@1", "external")],
                      edges=[LineageEdge(output="t/top@1", input="t/mid@1", method="exact", a=1, b=1),
                             LineageEdge(output="t/top@1", input="t/base@1", method="exact", a=0.5, b=-0.5),
                             LineageEdge(output="t/mid@1", input="t/base@1", method="svd", a=2, b=2),
                             LineageEdge(output="t/mid@1", input="hf/repo:x@1", method="svd", a=1, b=1)])
    graph = layout(lineage)
    row = {n.ref: n.y // (NODE_HEIGHT + ROW_GAP) for n in graph.nodes}
    assert row == {"hf/repo:x@1": 0, "t/base@1": 0, "t/mid@1": 1, "t/top@1": 2}
    assert {n.ref for n in graph.nodes if n.hub} == {"t/base@1", "hf/repo:x@1"}
    assert {n.ref for n in graph.nodes if not n.linked} == {"hf/repo:x@1"}  # no page for an external input
    assert all(e.y1 < e.y2 for e in graph.edges)  # every edge points down, input to output
    assert sorted(e.label for e in graph.edges) == ["exact 1", "exact a=0.5 b=-0.5", "svd 1", "svd 2"]
