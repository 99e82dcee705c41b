"""Catalog benchmark: provenance and list queries at 1,000 and 100,000 modules.

    python bench/catalog.py [--sizes 1000 100000] [--database-url URL]

Each catalog holds N modules (LoRA rows with tags, spread over 10 base models and 20 tasks),
among them a derivation chain of depth 1,000 (capped at N/10 for small catalogs): chain[k]
is made from chain[k-1] and one trained module, and the top of the chain has a fan-in of 100
(the previous link and 99 trained modules). Rows are bulk-inserted (the queries are what is
measured, not registration). Each query runs through the public Python API; the table shows
the median of 5 runs at each size and the ratio of the largest size to the smallest, so the
growth is visible. Target: every query under 200 ms at 100,000 modules on SQLite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from registry import Registry  # noqa: E402
from registry.db.models import Blob, Derivation, DerivationInput, Module, Tag  # noqa: E402

FAN_IN = 100
CHAIN_DEPTH = 1000
RUNS = 5


def module_row(index: int, name: str, kind: str, digest: str) -> dict:
    now = datetime.now(timezone.utc)
    return dict(
        id=index, namespace="bench", name=name, version=1, kind=kind, digest=digest, config_digest="0" * 64,
        peft_type="LORA", composable=True, unsupported=[], base_model=f"org/base-{index % 10}", base_revision=None,
        task_type="CAUSAL_LM", task=f"task-{index % 20}", rank=(4, 8, 16, 32)[index % 4], lora_alpha=16.0,
        use_rslora=False, use_dora=False, target_modules=["q_proj", "v_proj"],
        layers={"base_model.model.layers.0.q_proj": {"params": {"lora_A": [8, 64], "lora_B": [64, 8]}, "rank": 8}},
        config={"peft_type": "LORA", "r": 8}, dtype="BF16", num_parameters=1024, size_bytes=4096,
        description=None, owner="bench", source=None, created_at=now,
    )


def build(registry: Registry, size: int) -> dict[str, str]:
    """Fill an empty catalog; returns the refs the queries use."""
    depth = min(CHAIN_DEPTH, size // 10)
    digests = [f"{i:064x}" for i in range(16)]
    now = datetime.now(timezone.utc)
    modules, tags, derivations, edges = [], [], [], []
    leaf = iter(range(depth + 1, size + 1))  # ids of trained modules used as inputs
    for index in range(1, size + 1):
        in_chain = 2 <= index <= depth
        name = f"chain-{index:05d}" if index <= depth else f"trained-{index:06d}"
        modules.append(module_row(index, name, "derived" if in_chain else "trained", digests[index % 16]))
        tags.append(dict(module_id=index, key="team", value=f"team-{index % 50}"))
    for index in range(2, depth + 1):
        inputs = [index - 1] + [next(leaf) for _ in range((FAN_IN - 1) if index == depth else 1)]
        derivations.append(dict(
            module_id=index, expression="...", canonical="...", method="exact", method_version=1, parameters={},
            results={}, environment={}, identity=f"{index:064x}", created_at=now,
        ))
        for position, input_id in enumerate(inputs):
            edges.append(dict(module_id=index, position=position, input_id=input_id, input_digest=digests[input_id % 16],
                              a=0.5, b=0.5 if position else 1.0))
    with registry.engine.begin() as conn:
        conn.execute(insert(Blob), [dict(digest=d, size_bytes=4096, created_at=now) for d in digests])
        for table, rows in ((Module, modules), (Tag, tags), (Derivation, derivations), (DerivationInput, edges)):
            for start in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[start:start + 20_000])
    return {"top": f"bench/chain-{depth:05d}", "bottom": "bench/chain-00001", "middle": f"bench/chain-{depth // 2:05d}"}


def measure(fn) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(size: int, database_url: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{tmp}/bench.db"
        registry = Registry.init(tmp, database_url=url)
        refs = build(registry, size)
        queries = {
            "list --task --rank --tag": lambda: registry.list(task="task-3", rank=8, tags={"team": "team-3"}),
            "list --base-model --limit 100": lambda: registry.list(base_model="org/base-7", latest=True, limit=100),
            "list --base-model (N/10 rows)": lambda: registry.list(base_model="org/base-7", latest=True),
            "list --derived-from (middle)": lambda: registry.list(derived_from=refs["middle"]),
            "lineage (top of chain)": lambda: registry.lineage(refs["top"]),
            "descendants (bottom of chain)": lambda: registry.descendants(refs["bottom"]),
            "contents (top of chain)": lambda: registry.contents(refs["top"]),
        }
        results = {label: measure(fn) for label, fn in queries.items()}
        registry.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--database-url", help="an EMPTY database to fill (default: a temporary SQLite file)")
    args = parser.parse_args()
    by_size = {size: run(size, args.database_url) for size in args.sizes}
    small, large = min(args.sizes), max(args.sizes)
    print(f"{'query':32}" + "".join(f"{size:>12,} mods" for size in args.sizes) + f"{'ratio':>10}")
    for label in by_size[small]:
        cells = "".join(f"{by_size[size][label]:>14.1f} ms" for size in args.sizes)
        print(f"{label:32}{cells}{by_size[large][label] / by_size[small][label]:>9.1f}x")
    worst = max(by_size[large].values())
    print(f"\nslowest query at {large:,} modules: {worst:.1f} ms (target: under 200 ms)")


if __name__ == "__main__":
    main()
