"""The ``pem`` commands of the registry server, and the one place where the CLI chooses
between a local registry and a server.

``pem serve`` runs the server; ``pem token`` manages its tokens on the server's host;
``pem login URL`` stores a token for a server. With ``--registry URL`` or
``PEM_REGISTRY_URL``, every other command works against that server
(:func:`open_registry`), except the host-side ones (:data:`HOST_SIDE`), which say so.
Nothing here imports FastAPI or uvicorn until ``pem serve`` runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from registry.errors import ConfigurationError, PemError

# Commands that act on the database itself: they run on the server's host, never through it.
HOST_SIDE = ("init", "db", "token", "serve")


def remote_url(explicit: str | None = None) -> str | None:
    """The server the command runs against: ``--registry``, else ``PEM_REGISTRY_URL``, else None."""
    from registry.config import registry_url

    if explicit is None:
        ctx = click.get_current_context(silent=True)
        explicit = ctx.find_root().params.get("registry_url") if ctx is not None else None
    return registry_url(explicit)


def refuse_host_side(command: str | None, explicit_url: str | None) -> None:
    """Host-side commands refuse a registry URL in one line."""
    if command in HOST_SIDE and remote_url(explicit_url) is not None:
        raise PemError(
            f"pem {command} runs on the registry server's host, against its database: run it there, "
            "without --registry or PEM_REGISTRY_URL"
        )


def open_registry(home: str | None) -> Any:
    """The registry a command works on: the server named by --registry / PEM_REGISTRY_URL
    (``home`` then only holds the client's read cache and credentials), else the local one."""
    url = remote_url()
    if url is not None:
        from registry.remote import RemoteRegistry

        return RemoteRegistry(url, home=home)
    from registry import Registry

    return Registry.open(home)


def register(group: click.Group, home_option: Any, json_option: Any, echo_json: Any) -> None:
    """Add serve, token and login to the ``pem`` group."""

    @group.command()
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
    @click.option("--public-read", is_flag=True, help="Serve reads without a token (writes still need one).")
    @click.option("--trust-proxy", is_flag=True,
                  help="Behind a TLS proxy: trust its X-Forwarded-Proto (web sessions get Secure cookies).")
    @click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker processes.")
    @home_option
    def serve(host: str, port: int, public_read: bool, trust_proxy: bool, workers: int, home: str | None) -> None:
        """Serve the registry (--home / PEM_HOME / PEM_DATABASE_URL / PEM_STORE): the JSON API and the web view."""
        try:
            import uvicorn  # noqa: F401

            import registry.server.app  # noqa: F401
        except ImportError:
            raise ConfigurationError("pem serve needs the server extra: pip install 'pem-registry[server]'") from None
        import uvicorn

        from registry import Registry
        from registry.config import ENV_HOME, ENV_SERVER_PUBLIC_READ, ENV_SERVER_TRUST_PROXY

        if home:
            os.environ[ENV_HOME] = str(home)  # the workers open the registry from the environment
        if public_read:
            os.environ[ENV_SERVER_PUBLIC_READ] = "1"
        if trust_proxy:
            os.environ[ENV_SERVER_TRUST_PROXY] = "1"
        Registry.open().close()  # a missing or outdated registry fails here, in one line
        click.echo(f"serving {os.environ.get('PEM_DATABASE_URL') or os.environ.get(ENV_HOME) or '~/.pem'} "
                   f"on http://{host}:{port} ({workers} worker{'s' if workers > 1 else ''}"
                   f"{', public reads' if public_read else ''})", err=True)
        uvicorn.run("registry.server.app:environment_app", factory=True, host=host, port=port, workers=workers,
                    access_log=False, log_level="warning", server_header=False, proxy_headers=trust_proxy)

    @group.group("token")
    def token_group() -> None:
        """Tokens of the registry server (run on the server's host, against its database)."""

    @token_group.command("create")
    @click.option("--user", required=True, help="Who the token is for: recorded as owner and author of their changes.")
    @click.option("--role", required=True, type=click.Choice(["reader", "writer", "admin"]))
    @click.option("--namespace", "namespaces", multiple=True, metavar="NS",
                  help="A namespace a writer may write (repeatable; default: every namespace).")
    @click.option("--expires", type=float, metavar="DAYS", help="Expire after this many days (default: never).")
    @json_option
    @home_option
    def token_create(user: str, role: str, namespaces: tuple[str, ...], expires: float | None, as_json: bool,
                     home: str | None) -> None:
        """Create a token; it is shown once (only its hash is stored)."""
        from registry import Registry
        from registry.server.tokens import create_token

        with Registry.open(home) as registry:
            created = create_token(registry, user, role, list(namespaces), expires)
        if as_json:
            echo_json(created)
            return
        scope = f" for {', '.join(created.namespaces)}" if created.namespaces else ""
        expiry = f", expires {created.expires_at.isoformat(timespec='seconds')}" if created.expires_at else ""
        click.echo(f"token {created.id} for {created.user} ({created.role}{scope}{expiry}); shown once, keep it safe:")
        click.echo(created.token)

    @token_group.command("list")
    @json_option
    @home_option
    def token_list(as_json: bool, home: str | None) -> None:
        """List tokens (never the tokens themselves)."""
        from registry import Registry
        from registry.server.tokens import list_tokens

        with Registry.open(home) as registry:
            tokens = list_tokens(registry)
        if as_json:
            echo_json(tokens)
            return
        for t in tokens:
            state = "revoked" if t.revoked_at else (f"expires {t.expires_at.isoformat(timespec='seconds')}"
                                                    if t.expires_at else "no expiry")
            scope = ",".join(t.namespaces) or "*"
            click.echo(f"{t.id:<5}{t.user:<16}{t.role:<8}{scope:<20}{state}")
        if not tokens:
            click.echo("no tokens (pem token create --user NAME --role reader|writer|admin)")

    @token_group.command("revoke")
    @click.argument("token_id", metavar="ID", type=int)
    @home_option
    def token_revoke(token_id: int, home: str | None) -> None:
        """Revoke token ID: the server refuses it from the next request on."""
        from registry import Registry
        from registry.server.tokens import revoke_token

        with Registry.open(home) as registry:
            info = revoke_token(registry, token_id)
        click.echo(f"revoked token {info.id} of {info.user}")

    @group.command()
    @click.argument("url")
    @click.option("--token", help="The token (default: read from stdin, or asked for without echo).")
    @home_option
    def login(url: str, token: str | None, home: str | None) -> None:
        """Store a token for the registry server URL in a user-only credentials file."""
        from registry.config import registry_url
        from registry.remote import RemoteRegistry, store_token

        url = registry_url(url) or url
        if token is None:
            token = sys.stdin.readline().strip() if not sys.stdin.isatty() else click.prompt("token", hide_input=True)
        remote = RemoteRegistry(url, token=token, home=home)
        who = remote.whoami()  # a wrong token is refused here, not at the first command
        path = store_token(url, token, home)
        click.echo(f"logged in to {url} as {who['user']} ({who['role']}); token stored in {path}")
