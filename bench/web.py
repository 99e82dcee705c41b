"""Web catalog benchmark: each catalog page against the `pem list` query for the same rows.

    python bench/web.py [--sizes 1000 100000] [--backends sqlite postgresql] [--postgres-url URL]

Each catalog is filled as bench/catalog.py fills it (N LoRA rows with tags over 10 base models
and 20 tasks, a derivation chain). A page is served by the whole server stack in-process (the
ASGI app with its request context and access log, the thread hop, a signed-in session looked
up in the database, the catalog query, Jinja2 rendering), called the way uvicorn calls it:
one ASGI call per request, the response collected. No HTTP client is in the measurement:
httpx's in-process transport alone costs about 2 ms a request here, more than the server's
whole stack (1 ms for `/healthz`). The query is ``Registry.list`` with the page's arguments
(the same filters, sort, offset and limit), measured in the same run, alternately: median of
RUNS each.
Target: every page at most 2x its query (ratio column), at 100,000 modules, on both backends.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402

from bench.catalog import build  # noqa: E402
from registry import Registry  # noqa: E402
from registry.server.app import ServerOptions, create_app  # noqa: E402
from registry.server.web.pages import PER_PAGE  # noqa: E402
from registry.server.web.sessions import SESSION_COOKIE, open_session  # noqa: E402
from registry.server.tokens import create_token  # noqa: E402

RUNS = 15
TARGET_RATIO = 2.0


def pages(size: int, refs: dict[str, str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (page URL, the Registry.list arguments of the same rows)."""
    middle = max(1, size // PER_PAGE // 2)
    rows = {"offset": 0, "limit": PER_PAGE + 1}
    return {
        "first page": ("/", rows),
        "a middle page": (f"/?page={middle}", dict(rows, offset=(middle - 1) * PER_PAGE)),
        "sorted by size, descending": ("/?sort=size&desc=1", dict(rows, sort="size", descending=True)),
        "--task --rank --tag": ("/?task=task-3&rank=8&tag=team%3Dteam-3",
                                dict(rows, task="task-3", rank=8, tags={"team": "team-3"})),
        "--base-model --latest": ("/?base_model=org/base-7&latest=1", dict(rows, base_model="org/base-7", latest=True)),
        "--search": ("/?search=ained-0004", dict(rows, search="ained-0004")),
        "--derived-from (middle)": (f"/?derived_from={refs['middle']}", dict(rows, derived_from=refs["middle"])),
    }


def paired_ms(page: Callable[[], Any], query: Callable[[], Any]) -> tuple[float, float]:
    """Medians of the page and of the query, run alternately (so that load from elsewhere on
    the machine falls on both alike), after one warm-up run of each."""
    page(), query()
    page_times, query_times = [], []
    for _ in range(RUNS):
        for fn, times in ((page, page_times), (query, query_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(page_times) * 1000, statistics.median(query_times) * 1000


def run(size: int, database_url: str | None) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry.init(tmp, database_url=database_url or f"sqlite:///{tmp}/bench.db")
        refs = build(registry, size)
        session_id, _, _ = open_session(registry, create_token(registry, "bench", "reader").token)
        # The app driven from one event loop in this thread, as uvicorn drives it; the page's
        # catalog query runs in the app's thread pool, as served.
        loop = asyncio.new_event_loop()
        app = create_app(registry, ServerOptions())
        results = {}
        for label, (url, arguments) in pages(size, refs).items():
            def page() -> None:
                status, body = loop.run_until_complete(get(app, url, {SESSION_COOKIE: session_id}))
                assert status == 200 and b"<table" in body, body[:300]
            results[label] = paired_ms(page, lambda: registry.list(**arguments))
        loop.close()
        registry.close()
        return results


async def get(app: Any, url: str, cookies: dict[str, str]) -> tuple[int, bytes]:
    """One GET of ``url`` through the ASGI app, as a server calls it: (status, body)."""
    path, _, query = url.partition("?")
    cookie = "; ".join(f"{name}={value}" for name, value in cookies.items())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"bench"), (b"cookie", cookie.encode())],
             "client": ("127.0.0.1", 50000), "server": ("bench", 80)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def postgres_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    name = f"pem_bench_web_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                        help="a database to connect to while creating (and dropping) one per run")
    args = parser.parse_args()
    worst = 0.0
    for backend in args.backends:
        by_size = {}
        for size in args.sizes:
            if backend == "sqlite":
                by_size[size] = run(size, None)
            else:
                url, drop = postgres_database(args.postgres_url)
                try:
                    by_size[size] = run(size, url)
                finally:
                    drop()
        print(f"\n{backend}: page = GET served by the app (signed in, no HTTP client); query = Registry.list, same rows")
        print(f"{'catalog page':30}" + "".join(f"{f'{size:,} mods: page / query':>34}{'ratio':>7}" for size in args.sizes))
        for label in by_size[args.sizes[0]]:
            cells = ""
            for size in args.sizes:
                page_ms, query_ms = by_size[size][label]
                worst = max(worst, page_ms / query_ms) if size == max(args.sizes) else worst
                cells += f"{page_ms:>22.1f} / {query_ms:>6.1f} ms{page_ms / query_ms:>6.2f}x"
            print(f"{label:30}{cells}")
    print(f"\nlargest page/query ratio at {max(args.sizes):,} modules: {worst:.2f}x (target: at most {TARGET_RATIO:.0f}x)")


if __name__ == "__main__":
    main()
