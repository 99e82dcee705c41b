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
=======================  ===========================================================  ===================================

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
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"

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
