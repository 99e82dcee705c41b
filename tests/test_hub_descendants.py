"""`pem descendants` shows where derived modules were published (issue 4, with Hub sync)."""

from __future__ import annotations

import uuid

from independent import make_numpy_lora


def test_descendants_show_where_they_were_published(registry, run_pem, hub, tmp_path):
    registry.add(make_numpy_lora(tmp_path / "a", seed=1), "team/a")
    registry.add(make_numpy_lora(tmp_path / "b", seed=2), "team/b")
    registry.compose("0.5*team/a + 0.5*team/b", "team/ab", method="exact")
    registry.compose("team/ab - 0.1*team/a", "team/abc", method="exact")
    repo = f"org/ab-{uuid.uuid4().hex[:8]}"
    registry.push("team/ab", repo, endpoint=hub.url)

    found = {d.ref: d for d in registry.descendants("team/a")}
    assert found["team/ab@1"].published == [f"{repo}@main:{hub.head(repo)[:12]}"]
    assert found["team/abc@1"].published == []  # not pushed

    result = run_pem("descendants", "team/a")
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("team/ab@1"))
    assert f"published: {repo}@main:{hub.head(repo)[:12]}" in line
