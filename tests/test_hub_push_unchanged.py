"""Pushing content the branch already holds (issue 14): no commit, nothing new recorded, a
message saying so, and none of huggingface_hub's own "Skipping" warning on stderr. Against
the suite's Hub server (``hub`` fixture) with the real client, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from helpers import make_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORKTREE = Path(__file__).resolve().parent.parent


def pem(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The real command in its own process: stderr is what a terminal would show."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=WORKTREE, env={**os.environ, **env},
                          capture_output=True, text=True)


def push_links(registry) -> int:
    from registry.db.models import HubLink

    with Session(registry.engine) as session:
        return session.scalar(select(func.count()).select_from(HubLink).where(HubLink.direction == "push"))


def test_pushing_unchanged_content_records_nothing_and_says_so(hub, registry, pem_env, tmp_path):
    registry.add(make_lora(tmp_path / "a", seed=71), "team/a")
    repo = f"unchanged-{uuid.uuid4().hex[:8]}/a"

    first = pem(pem_env, "push", "team/a", repo)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("pushed team/a@1 to ")
    commits, head = len(hub.commits(repo)), hub.head(repo)
    assert push_links(registry) == 1

    again = pem(pem_env, "push", "team/a", repo)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"nothing changed: {hub.url.rstrip('/')}/{repo} (main @ {head[:12]}) already holds team/a@1"
    assert "Skipping" not in again.stderr and "No files have been modified" not in again.stderr
    assert len(hub.commits(repo)) == commits and hub.head(repo) == head
    assert push_links(registry) == 1  # nothing new recorded

    result = registry.push("team/a", repo)
    assert (result.changed, result.commit) == (False, head)
    assert push_links(registry) == 1
