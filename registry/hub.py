"""Hugging Face Hub access, through the real ``huggingface_hub`` client.

The endpoint comes from configuration (``HF_ENDPOINT`` or ``--endpoint``), never from a
constant, so a team's mirror or self-hosted Hub works; tokens come from huggingface_hub's
usual sources (``HF_TOKEN``, the token file) and are never stored by the registry. Every
client error becomes a one-line :class:`registry.errors.HubError`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from registry.errors import HubError


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Translate huggingface_hub and network exceptions into one-line HubErrors."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{what}: revision not found on the Hub") from None
    except hf_errors.EntryNotFoundError:
        raise HubError(f"{what}: file not found in the repository") from None
    except hf_errors.GatedRepoError:
        raise HubError(f"{what}: the repository is gated: accept its terms on the Hub first") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{what}: repository not found (or not visible with your token)") from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"{what}: unauthorized: check HF_TOKEN or run `hf auth login`") from None
        raise HubError(f"{what}: the Hub answered {status or 'an error'}: {str(exc).splitlines()[0]}") from None
    except (OSError, hf_errors.LocalEntryNotFoundError) as exc:
        raise HubError(f"{what}: cannot reach the Hub ({exc.__class__.__name__}): check HF_ENDPOINT and the network") from None


def download_config(repo_id: str, revision: str | None, endpoint: str) -> Path:
    """Download a model's config.json alone (no weights)."""
    from huggingface_hub import hf_hub_download

    with hub_errors(f"config.json of {repo_id}"):
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, endpoint=endpoint))
