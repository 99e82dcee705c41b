"""Configuration, read from the environment in this one place.

=====================  ===========================================================  ==============================
variable               meaning                                                      default
=====================  ===========================================================  ==============================
``PEM_HOME``           the registry's home folder                                   ``~/.pem``
``PEM_DATABASE_URL``   any SQLAlchemy URL (``postgresql+psycopg://...`` for teams)  ``sqlite:///$PEM_HOME/registry.db``
``PEM_STORE``          where blobs live (a folder path)                             ``$PEM_HOME/blobs``
``PEM_USER``           the owner recorded on registrations                          the OS user
``HF_ENDPOINT``        the Hugging Face Hub (or a mirror) to pull from and push to  ``https://huggingface.co``
=====================  ===========================================================  ==============================

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
ENV_HUB_ENDPOINT = "HF_ENDPOINT"  # the name huggingface_hub itself reads
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"

DEFAULT_HOME = "~/.pem"
DATABASE_FILENAME = "registry.db"
BLOBS_DIRNAME = "blobs"


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
        if "://" in store_location and not store_location.startswith("file://"):
            scheme = store_location.split("://", 1)[0]
            raise ConfigurationError(
                f"{ENV_STORE}={store_location!r}: the {scheme!r} blob store is not available in this "
                "version; use a folder path"
            )
        store_location = store_location.removeprefix("file://")
        owner = user or os.environ.get(ENV_USER) or _os_user()
        endpoint = (hub_endpoint or os.environ.get(ENV_HUB_ENDPOINT) or DEFAULT_HUB_ENDPOINT).rstrip("/")
        return cls(home=home_path, database_url=url, store=store_location, user=owner, hub_endpoint=endpoint)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers): still record something
        return "unknown"
