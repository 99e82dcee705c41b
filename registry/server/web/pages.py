"""Routes of the web view: the catalog (``/``), module pages (``/modules/REF``), the archive
download, login and logout. Every page is one or a few :mod:`registry.api` calls rendered by a
template; errors render an error page with the status the JSON API would answer."""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from registry.api.catalog import SORT_COLUMNS
from registry.api.common import WEIGHTS_FILE, parse_tag
from registry.errors import AuthenticationError, BlobStoreError, InvalidRequestError, PemError
from registry.server.errors import status_for
from registry.server.tokens import Identity
from registry.server.web import sessions
from registry.server.web.graph import coefficient_label, layout

log = logging.getLogger("pem.server")

HERE = Path(__file__).parent
PER_PAGE = 100
MAX_PER_PAGE = 500
MAX_PAGE = 1_000_000
FILTERS = ("base_model", "peft_type", "task", "rank", "tag", "kind", "derived_from", "latest", "search")
CATALOG_PARAMS = (*FILTERS, "sort", "desc", "page", "per_page")
KINDS = ("trained", "derived", "ported", "pulled")
COLUMNS = (  # header, sort key (None: not sortable)
    ("Module", "name"), ("Kind", "kind"), ("PEFT type", "peft_type"), ("Base model", "base_model"),
    ("Task", "task"), ("Rank", "rank"), ("Dtype", "dtype"), ("Size", "size"), ("Tags", None),
    ("Aliases", None), ("Created", "created"),
)
# Pages load only what this server serves: a stray reference to another host is blocked.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class LoginRequired(Exception):
    pass


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = human_size
    env.filters["page_url"] = lambda ref: "/modules/" + quote(ref, safe="/@:")
    env.filters["download_url"] = lambda ref: "/download/" + quote(ref, safe="/@:")
    # Filters, not method calls, in the catalog's rows: Jinja checks every call it makes from
    # a template, which cost a tenth of a 100-row page.
    env.filters["iso"] = lambda moment: moment.isoformat()
    env.filters["minute"] = lambda moment: moment.strftime("%Y-%m-%d %H:%M")
    env.globals["coefficient_label"] = coefficient_label
    return env


def install(app: FastAPI, registry: Any, options: Any) -> None:
    """Add the web view's routes to ``app``."""
    env = templates()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def secure(request: Request) -> bool:
        """Whether the browser reached us over HTTPS: the scheme, or behind a proxy configured
        as trusted (``--trust-proxy``), its X-Forwarded-Proto."""
        if options.trust_proxy and request.headers.get("x-forwarded-proto"):
            return request.headers["x-forwarded-proto"].split(",")[0].strip() == "https"
        return request.url.scheme == "https"

    def render(request: Request, template: str, code: int = 200, **values: Any) -> HTMLResponse:
        html = env.get_template(template).render(request=request, who=getattr(request.state, "viewer", None),
                                                 public_read=options.public_read,
                                                 logout_csrf=sessions.logout_token(request.cookies.get(sessions.SESSION_COOKIE)),
                                                 **values)
        return HTMLResponse(html, status_code=code, headers={"Content-Security-Policy": CSP,
                                                               "X-Content-Type-Options": "nosniff",
                                                               "Referrer-Policy": "same-origin"})

    def viewer(request: Request) -> Identity | None:
        """The signed-in user (None on a public registry without a session); LoginRequired
        when reading needs a token and the browser has no open session."""
        who = sessions.session_identity(registry, request.cookies.get(sessions.SESSION_COOKIE))
        if who is None and not options.public_read:
            raise LoginRequired()
        request.state.viewer = who
        if who is not None:
            request.state.user = who.user
        return who

    def page(handler: Callable[..., Response]) -> Callable[..., Any]:
        """A page route: the viewer checked, registry errors as an error page with the API's
        status, anything unexpected as a 500 page naming the request id (logged)."""

        @functools.wraps(handler)  # FastAPI reads the handler's parameters (the path's ref)
        def route(request: Request, **kwargs: Any) -> Response:
            try:
                viewer(request)
                return handler(request, **kwargs)
            except LoginRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
            except PemError as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return render(request, "error.html", status_for(exc), status=status_for(exc), message=message)
            except Exception:
                request_id = request.state.request_id
                log.exception("request %s failed: GET %s", request_id, request.url.path)
                return render(request, "error.html", 500, status=500,
                              message=f"the server failed (request id {request_id}); its log has the details")

        return route

    # --- catalog ------------------------------------------------------------------------------

    def catalog(request: Request) -> Response:
        query = catalog_query(request)
        rows = registry.list(**query.api_arguments(), offset=(query.page - 1) * query.per_page, limit=query.per_page + 1)
        return render(request, "catalog.html", modules=rows[:query.per_page], has_next=len(rows) > query.per_page,
                      query=query, columns=COLUMNS, kinds=KINDS)

    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page(catalog))

    # --- module pages -------------------------------------------------------------------------

    def module(request: Request, ref: str) -> Response:
        details = registry.get(ref)
        lineage = registry.lineage(details.ref)
        graph = layout(lineage)
        links = [link for link in registry.hub_links() if link.ref == details.ref]
        base = str(request.base_url).rstrip("/")
        return render(
            request, "module.html", m=details, graph=graph, history=registry.history(details.ref),
            alias_moves=registry.alias_log(details.name), descendants=registry.descendants(details.ref),
            contents=registry.contents(details.ref), hub_links=links,
            export_command=f"PEM_REGISTRY_URL={base} pem export {details.ref} ./{details.name.replace('/', '-')}-{details.version}",
        )

    app.get("/modules/{ref:path}", response_class=HTMLResponse, include_in_schema=False)(page(module))

    def download(request: Request, ref: str) -> Response:
        details = registry.get(ref)
        archive = export_archive(registry, details.ref, details.digest)
        filename = f"{details.name.replace('/', '-')}-{details.version}.zip"
        return FileResponse(archive, media_type="application/zip", filename=filename,
                            headers={"X-Pem-Digest": details.digest},
                            background=BackgroundTask(shutil.rmtree, archive.parent, ignore_errors=True))

    app.get("/download/{ref:path}", include_in_schema=False)(page(download))

    # --- login and logout ---------------------------------------------------------------------

    def login_form(request: Request, next_page: str, error: str | None = None, status: int = 200) -> Response:
        csrf = sessions.new_csrf_token()
        response = render(request, "login.html", status, csrf=csrf, next_page=next_page, error=error)
        response.set_cookie(sessions.CSRF_COOKIE, csrf, httponly=True, samesite="strict", secure=secure(request),
                            path="/", max_age=3600)
        return response

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> Response:
        request.state.viewer = sessions.session_identity(registry, request.cookies.get(sessions.SESSION_COOKIE))
        return login_form(request, safe_next(request.query_params.get("next")))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await form_fields(request)
        next_page = safe_next(form.get("next"))
        if not sessions.csrf_matches(request.cookies.get(sessions.CSRF_COOKIE), form.get("csrf")):
            return login_form(request, next_page, "the form expired or came from another site: sign in again", 403)
        try:
            session_id, expires, _ = await run_in_threadpool(sessions.open_session, registry, form.get("token", "").strip())
        except AuthenticationError as exc:
            return login_form(request, next_page, str(exc).splitlines()[0], 401)
        response = RedirectResponse(next_page, status_code=303)
        response.set_cookie(sessions.SESSION_COOKIE, session_id, expires=expires, httponly=True, samesite="lax",
                            secure=secure(request), path="/")
        response.delete_cookie(sessions.CSRF_COOKIE, path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await form_fields(request)
        session_id = request.cookies.get(sessions.SESSION_COOKIE)
        if not sessions.csrf_matches(sessions.logout_token(session_id), form.get("csrf")):
            return render(request, "error.html", 403, status=403, message="the form came from another site: not signed out")
        await run_in_threadpool(sessions.end_session, registry, session_id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(sessions.SESSION_COOKIE, path="/")
        return response


class CatalogQuery:
    """The catalog's query parameters, checked: the filters of ``pem list`` under the same
    names, the search, the sort and the page."""

    def __init__(self, params: dict[str, list[str]]):
        unknown = sorted(set(params) - set(CATALOG_PARAMS))
        if unknown:
            raise InvalidRequestError(f"unknown filter {unknown[0]!r}: use {', '.join(CATALOG_PARAMS)}")
        for name, values in params.items():
            if len(values) > 1 and name != "tag":
                raise InvalidRequestError(f"{name} is given {len(values)} times; give it once")
        one = {name: values[0].strip() for name, values in params.items() if name != "tag"}
        self.filters = {name: one[name] for name in FILTERS if one.get(name) and name not in ("tag", "latest")}
        self.tags = [t for t in params.get("tag", []) if t.strip()]
        self.tag_pairs = dict(parse_tag(t.strip()) for t in self.tags)
        self.latest = one.get("latest", "") in ("1", "true", "on", "yes")
        if self.filters.get("kind") and self.filters["kind"] not in KINDS:
            raise InvalidRequestError(f"unknown kind {self.filters['kind']!r}: use {', '.join(KINDS)}")
        self.sort = one.get("sort") or "name"
        if self.sort not in SORT_COLUMNS:
            raise InvalidRequestError(f"cannot sort by {self.sort!r}: use {', '.join(SORT_COLUMNS)}")
        self.descending = one.get("desc", "") in ("1", "true")
        self.page = _integer(one.get("page"), "page", 1, MAX_PAGE, 1)
        self.per_page = _integer(one.get("per_page"), "per_page", 1, MAX_PER_PAGE, PER_PAGE)
        if "rank" in self.filters:
            _integer(self.filters["rank"], "rank", 0, 2**31 - 1, 0)

    def api_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = dict(self.filters)
        if "rank" in arguments:
            arguments["rank"] = int(arguments["rank"])
        return dict(arguments, tags=self.tag_pairs, latest=self.latest, sort=self.sort, descending=self.descending)

    def url(self, **changes: Any) -> str:
        """This query's URL with some parameters changed (None removes one)."""
        values: dict[str, Any] = dict(self.filters, tag=self.tags, latest="1" if self.latest else None,
                                      sort=None if self.sort == "name" else self.sort,
                                      desc="1" if self.descending else None,
                                      page=self.page if self.page > 1 else None,
                                      per_page=self.per_page if self.per_page != PER_PAGE else None)
        values.update(changes)
        pairs = [(k, v) for k, v in values.items() if v is not None and v != [] and not isinstance(v, list)]
        pairs += [(k, item) for k, v in values.items() if isinstance(v, list) for item in v]
        return "/" + ("?" + urlencode(pairs) if pairs else "")

    def sort_url(self, key: str) -> str:
        return self.url(sort=None if key == "name" else key, desc="1" if key == self.sort and not self.descending else None,
                        page=None)


def catalog_query(request: Request) -> CatalogQuery:
    return CatalogQuery(parse_qs(request.url.query, keep_blank_values=True))


def _integer(text: str | None, name: str, low: int, high: int, default: int) -> int:
    if not text:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidRequestError(f"{name} is a whole number from {low} to {high:,}")
    return int(text)


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this server only (never another site)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


async def form_fields(request: Request) -> dict[str, str]:
    """A small url-encoded form (login, logout), without another dependency."""
    body = (await request.body())[:16_384].decode("utf-8", "replace")
    return {key: values[0] for key, values in parse_qs(body).items()}


def export_archive(registry: Any, ref: str, digest: str) -> Path:
    """The PEFT folder of ``ref`` as a zip, written by ``registry.export`` into a temporary
    folder; the weights are hashed against the module's digest before the archive exists, so
    a damaged blob sends nothing."""
    folder = Path(tempfile.mkdtemp(prefix="pem-download-"))
    try:
        exported = registry.export(ref, folder / "adapter")
        hasher = hashlib.sha256()
        with open(exported / WEIGHTS_FILE, "rb") as f:
            for chunk in iter(lambda: f.read(1024 * 1024), b""):
                hasher.update(chunk)
        if hasher.hexdigest() != digest:
            raise BlobStoreError(f"the blob of {ref} is damaged (its bytes hash to sha256:{hasher.hexdigest()[:12]}, "
                                 f"not sha256:{digest[:12]}): nothing was sent; run `pem verify`")
        archive = folder / "adapter.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(exported.iterdir()):
                zf.write(path, path.name)
        return archive
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
