"""Graph queries over the derivation graph, in SQL (recursive CTEs that run on SQLite and
PostgreSQL), never by walking rows one at a time from Python.

Edges are ``derivation_inputs`` rows: ``module_id`` was made from ``input_id`` with
coefficients ``a`` (unsigned) and ``b`` (signed). Derivations only reference modules that
existed before them, so the graph is acyclic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, and_, func, literal, or_, select
from sqlalchemy.orm import Session

from registry.db.models import Derivation, DerivationInput, Module
from registry.methods import METHODS

# Steps whose coefficients compose along paths (pem contents multiplies through them).
LINEAR_METHODS = sorted([name for name, m in METHODS.items() if m.linear] + ["port"])


def ancestor_ids(root_id: int):
    """A CTE of ``root_id`` and every module it was derived from, transitively (each once)."""
    base = select(literal(root_id, Integer).label("id"))
    cte = base.cte("ancestors", recursive=True)
    step = select(DerivationInput.input_id).join(cte, DerivationInput.module_id == cte.c.id)
    return cte.union(step)


def descendant_ids(root_id: int):
    """A CTE of ``root_id`` and every module derived from it, transitively (each once)."""
    base = select(literal(root_id, Integer).label("id"))
    cte = base.cte("descendants", recursive=True)
    step = select(DerivationInput.module_id).join(cte, DerivationInput.input_id == cte.c.id)
    return cte.union(step)


def edges_into(session: Session, ids_cte: Any) -> list[Any]:
    """Every edge whose output is in ``ids_cte``, with its method (one query)."""
    query = (
        select(
            DerivationInput.module_id, DerivationInput.input_id, DerivationInput.input_digest, DerivationInput.external,
            DerivationInput.a, DerivationInput.b, DerivationInput.position, Derivation.method,
        )
        .join(Derivation, Derivation.module_id == DerivationInput.module_id)
        .where(DerivationInput.module_id.in_(select(ids_cte.c.id)))
        .order_by(DerivationInput.module_id, DerivationInput.position)
    )
    return list(session.execute(query))


@dataclass(frozen=True)
class Node:
    """What graph queries need of a module (not the whole row)."""

    id: int
    ref: str
    digest: str
    kind: str
    peft_type: str


def modules_by_id(session: Session, ids_cte: Any) -> dict[int, Node]:
    rows = session.execute(
        select(Module.id, Module.namespace, Module.name, Module.version, Module.digest, Module.kind, Module.peft_type)
        .where(Module.id.in_(select(ids_cte.c.id)))
    )
    return {
        r.id: Node(r.id, f"{r.namespace}/{r.name}@{r.version}", r.digest, r.kind, r.peft_type) for r in rows
    }


def shortest_paths(root_id: int, edges: list[Any]) -> dict[int, list[int]]:
    """Breadth-first over the returned edges (output <- input): the shortest path from the
    root to each descendant."""
    children: dict[int, list[int]] = {}
    for edge in edges:
        children.setdefault(edge.input_id, []).append(edge.module_id)
    paths = {root_id: [root_id]}
    queue = deque([root_id])
    while queue:
        node = queue.popleft()
        for child in sorted(children.get(node, [])):
            if child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    return paths


def effective_weights(session: Session, root_id: int) -> list[tuple[int | None, str, float, float]]:
    """(module id, digest, a, b) of each module where the linear walk from ``root_id``
    stops: a module that was not derived, one derived by a non-linear method, or an
    external input (id None, known by digest). Coefficients multiply along a path and add
    over paths (SEMANTICS.md section 2). The root's own derivation is always opened,
    whatever its method, so that the contents of a non-linear module are its inputs'
    contents; a root that was not derived contains itself."""
    root_digest = session.scalar(select(Module.digest).where(Module.id == root_id))
    root_derived = session.scalar(select(Derivation.module_id).where(Derivation.module_id == root_id)) is not None
    walk = select(
        literal(root_id, Integer).label("id"), literal(root_digest).label("digest"),
        literal(1.0).label("a"), literal(1.0).label("b"),
    ).cte("walk", recursive=True)
    opened = or_(Derivation.method.in_(LINEAR_METHODS), walk.c.id == root_id)
    step = (
        select(
            DerivationInput.input_id, DerivationInput.input_digest,
            walk.c.a * DerivationInput.a, walk.c.b * DerivationInput.b,
        )
        .join(walk, DerivationInput.module_id == walk.c.id)
        .join(Derivation, and_(Derivation.module_id == walk.c.id, opened))
    )
    walk = walk.union_all(step)
    linear_outputs = select(Derivation.module_id).where(Derivation.method.in_(LINEAR_METHODS))
    query = (
        select(walk.c.id, walk.c.digest, func.sum(walk.c.a), func.sum(walk.c.b))
        .where(or_(walk.c.id.is_(None), walk.c.id.not_in(linear_outputs)))
        .group_by(walk.c.id, walk.c.digest)
        .order_by(walk.c.id, walk.c.digest)
    )
    if root_derived:
        query = query.where(or_(walk.c.id.is_(None), walk.c.id != root_id))
    return [(row[0], row[1], float(row[2]), float(row[3])) for row in session.execute(query)]


def external_label(external: dict[str, Any] | None, digest: str) -> str:
    """How an external input is named: its ref where it was made, and its Hub repo if known."""
    external = external or {}
    ref = external.get("ref") or f"sha256:{digest[:12]}"
    return f"{external['repo_id']}:{ref}" if external.get("repo_id") else f"external:{ref}"
