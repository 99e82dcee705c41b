"""Configuration, read from the environment in this one place.

=======================  ===========================================================  ===================================
variable                 meaning                                                      default
=======================  ===========================================================  ===================================
``PEM_HOME``             the registry's home folder                                   ``~/.pem``
``PEM_DATABASE_URL``     any SQLAlchemy URL (``postgresql+psycopg://...`` for teams)  ``sqlite:///$PEM_HOME/registry.db``
``PEM_STORE``            where blobs live: a folder path, or ``s3://BUCKET/PREFIX``   ``$PEM_HOME/blobs``
``PEM_S3_ENDPOINT_URL``  the endpoint of a non-AWS S3 service (MinIO, R2, Ceph)       boto3's (AWS config, AWS)
``PEM_CACHE_SIZE``       bound of the read cache of an ``s3://`` store, in bytes or   ``20GB``
                         with a unit (``500MB``, ``10GB``, ``1.5GiB``)
``PEM_USER``             the owner recorded on registrations                          the OS user
``HF_ENDPOINT``          the Hugging Face Hub (or a mirror) to pull from and push to  ``https://huggingface.co``
``PEM_REGISTRY_URL``     a registry server (``pem serve``) to use instead of a local  none (a local registry)
                         database and store: ``http://HOST:PORT``
``PEM_TOKEN``            the token sent to that server                                ``pem login``'s, else none
``PEM_SERVER_MAX_BODY``  ``pem serve``: the largest JSON request body                 ``1MB``
``PEM_SERVER_MAX_UPLOAD``  ``pem serve``: the largest adapter upload (``pem add``)    ``10GB``
=======================  ===========================================================  ===================================

The vLLM resolver plugin (:mod:`registry.serving.vllm_plugin`) also reads:

==========================  ========================================================  ==================================
variable                    meaning                                                   default
==========================  ========================================================  ==================================
``PEM_VLLM_BASE_MODEL``     the registry base model the served model is               vLLM's ``--model`` value
``PEM_VLLM_NAMESPACES``     comma-separated namespaces that may be served             every namespace
``PEM_VLLM_CACHE``          where modules are exported, one folder per digest         ``~/.cache/pem-registry/vllm``
``PEM_VLLM_POLL_SECONDS``   how often loaded aliases and latest names are re-checked  ``10``
``PEM_VLLM_SERVER_URL``     this vLLM server, where moved names are unloaded          ``http://127.0.0.1:<--port>``
==========================  ========================================================  ==================================

With ``PEM_STORE=s3://BUCKET/PREFIX``, credentials, region and endpoint come from boto3's
usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/config``, instance roles, ``AWS_ENDPOINT_URL_S3``); ``PEM_S3_ENDPOINT_URL`` wins over
the endpoint found there. Blobs read from the bucket are cached in ``$PEM_HOME/cache``.

Options passed explicitly (``--home`` on the command line, keyword arguments of
:meth:`registry.Registry.open`) win over the environment.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ConfigurationError

ENV_HOME = "PEM_HOME"
ENV_DATABASE_URL = "PEM_DATABASE_URL"
ENV_STORE = "PEM_STORE"
ENV_USER = "PEM_USER"
ENV_S3_ENDPOINT_URL = "PEM_S3_ENDPOINT_URL"
ENV_CACHE_SIZE = "PEM_CACHE_SIZE"
ENV_HUB_ENDPOINT = "HF_ENDPOINT"  # the name huggingface_hub itself reads
ENV_TOKEN = "PEM_TOKEN"
ENV_SERVER_MAX_BODY = "PEM_SERVER_MAX_BODY"
ENV_SERVER_MAX_UPLOAD = "PEM_SERVER_MAX_UPLOAD"
DEFAULT_SERVER_MAX_BODY = "1MB"
DEFAULT_SERVER_MAX_UPLOAD = "10GB"
CREDENTIALS_FILENAME = "credentials.json"  # `pem login`'s tokens, in the home folder, mode 0600
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
ENV_REGISTRY_URL = "PEM_REGISTRY_URL"  # a `pem serve` server (the vLLM plugin's third way to name a registry)
ENV_VLLM_BASE_MODEL = "PEM_VLLM_BASE_MODEL"
ENV_VLLM_NAMESPACES = "PEM_VLLM_NAMESPACES"
ENV_VLLM_CACHE = "PEM_VLLM_CACHE"
ENV_VLLM_POLL_SECONDS = "PEM_VLLM_POLL_SECONDS"
ENV_VLLM_SERVER_URL = "PEM_VLLM_SERVER_URL"
DEFAULT_VLLM_CACHE = "~/.cache/pem-registry/vllm"
DEFAULT_VLLM_POLL_SECONDS = 10.0

DEFAULT_HOME = "~/.pem"
DATABASE_FILENAME = "registry.db"
BLOBS_DIRNAME = "blobs"
CACHE_DIRNAME = "cache"  # the read cache of an s3:// store, in the home folder
DEFAULT_CACHE_SIZE = "20GB"


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    store: str
    user: str
    hub_endpoint: str

    @classmethod
    def resolve(
        cls,
        home: str | os.PathLike[str] | None = None,
        database_url: str | None = None,
        store: str | None = None,
        user: str | None = None,
        hub_endpoint: str | None = None,
    ) -> "Settings":
        """Explicit arguments first, then the environment, then the defaults."""
        home_path = Path(home or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser().absolute()
        url = database_url or os.environ.get(ENV_DATABASE_URL) or f"sqlite:///{home_path / DATABASE_FILENAME}"
        store_location = store or os.environ.get(ENV_STORE) or str(home_path / BLOBS_DIRNAME)
        if store_location.startswith("s3://"):
            if not store_location.removeprefix("s3://").split("/", 1)[0]:
                raise ConfigurationError(f"{ENV_STORE}={store_location!r} names no bucket: use s3://BUCKET/PREFIX")
        elif "://" in store_location and not store_location.startswith("file://"):
            scheme = store_location.split("://", 1)[0]
            raise ConfigurationError(
                f"{ENV_STORE}={store_location!r}: the {scheme!r} blob store is not available in this "
                "version; use a folder path or s3://BUCKET/PREFIX"
            )
        store_location = store_location.removeprefix("file://")
        owner = user or os.environ.get(ENV_USER) or _os_user()
        if len(owner) > 128:
            raise ConfigurationError(f"{ENV_USER} is {len(owner)} characters long; the limit is 128")
        endpoint = (hub_endpoint or os.environ.get(ENV_HUB_ENDPOINT) or DEFAULT_HUB_ENDPOINT).rstrip("/")
        return cls(home=home_path, database_url=url, store=store_location, user=owner, hub_endpoint=endpoint)


def s3_endpoint_url() -> str | None:
    """``PEM_S3_ENDPOINT_URL``, or None: boto3 then finds the endpoint itself (AWS by default)."""
    return os.environ.get(ENV_S3_ENDPOINT_URL) or None


def cache_size_limit() -> int:
    """``PEM_CACHE_SIZE`` in bytes (default 20 GB)."""
    text = os.environ.get(ENV_CACHE_SIZE) or DEFAULT_CACHE_SIZE
    try:
        return parse_size(text)
    except ValueError:
        raise ConfigurationError(
            f"{ENV_CACHE_SIZE}={text!r} is not a size: use bytes or a number with a unit, e.g. 500MB, 20GB, 1.5GiB"
        ) from None


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """``"20GB"`` -> 20_000_000_000; ``"1.5GiB"``, ``"500 MB"``, ``"1048576"`` (bytes). ValueError if not a size."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = stripped[len(number):].strip()
    if unit not in _SIZE_UNITS or not number:
        raise ValueError(text)
    value = float(number) * _SIZE_UNITS[unit]
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return int(value)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers): still record something
        return "unknown"


@dataclass(frozen=True)
class ServingSettings:
    """What the vLLM resolver plugin reads from vLLM's environment."""

    registry_named: str | None  # the variable that names the registry, None when none does
    base_model: str | None  # None: vLLM's --model value
    namespaces: frozenset[str] | None  # None: every namespace
    cache: Path
    poll_seconds: float
    server_url: str | None  # None: derived from vLLM's own command line

    @classmethod
    def from_environment(cls) -> "ServingSettings":
        # In the order Registry.open() follows: a server's URL wins over a local registry.
        named = next((var for var in (ENV_REGISTRY_URL, ENV_DATABASE_URL, ENV_HOME) if os.environ.get(var)), None)
        listed = os.environ.get(ENV_VLLM_NAMESPACES, "")
        namespaces = frozenset(part.strip() for part in listed.split(",") if part.strip()) or None
        poll_text = os.environ.get(ENV_VLLM_POLL_SECONDS) or str(DEFAULT_VLLM_POLL_SECONDS)
        try:
            poll = float(poll_text)
        except ValueError:
            poll = -1.0
        if not 0 < poll <= 60:
            raise ConfigurationError(f"{ENV_VLLM_POLL_SECONDS}={poll_text!r}: use a number of seconds in (0, 60]")
        return cls(
            registry_named=named,
            base_model=os.environ.get(ENV_VLLM_BASE_MODEL) or None,
            namespaces=namespaces,
            cache=Path(os.environ.get(ENV_VLLM_CACHE) or DEFAULT_VLLM_CACHE).expanduser().absolute(),
            poll_seconds=poll,
            server_url=(os.environ.get(ENV_VLLM_SERVER_URL) or "").rstrip("/") or None,
        )


def is_registry_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


def registry_url(explicit: str | None = None) -> str | None:
    """The registry server to use: an explicit URL (``--registry``), else ``PEM_REGISTRY_URL``,
    else None (a local registry)."""
    url = explicit or os.environ.get(ENV_REGISTRY_URL) or None
    if url is not None and not is_registry_url(url):
        raise ConfigurationError(f"registry URL {url!r} is not http:// or https://: use e.g. http://registry.internal:8080")
    return url.rstrip("/") if url else None


def server_limit(variable: str, default: str) -> int:
    """A size limit of `pem serve` (``PEM_SERVER_MAX_BODY``, ``PEM_SERVER_MAX_UPLOAD``) in bytes."""
    text = os.environ.get(variable) or default
    try:
        return parse_size(text)
    except ValueError:
        raise ConfigurationError(f"{variable}={text!r} is not a size: use bytes or a number with a unit, e.g. 1MB") from None


ENV_SERVER_PUBLIC_READ = "PEM_SERVER_PUBLIC_READ"  # set by `pem serve --public-read` for its workers


def server_public_read() -> bool:
    return os.environ.get(ENV_SERVER_PUBLIC_READ, "") in ("1", "true", "yes")


ENV_SERVER_TRUST_PROXY = "PEM_SERVER_TRUST_PROXY"  # set by `pem serve --trust-proxy` for its workers


def server_trust_proxy() -> bool:
    """Whether ``pem serve`` sits behind a TLS proxy it trusts to set X-Forwarded-Proto."""
    return os.environ.get(ENV_SERVER_TRUST_PROXY, "") in ("1", "true", "yes")
