"""Graph queries over the derivation graph, in SQL (recursive CTEs that run on SQLite and
PostgreSQL), never by walking rows one at a time from Python.

Edges are ``derivation_inputs`` rows: ``module_id`` was made from ``input_id`` with
coefficients ``a`` (unsigned) and ``b`` (signed). Derivations only reference modules that
existed before them, so the graph is acyclic; but a catalog corrupted before schema 0005 (a
compose that raced `pem rm` and reused its input's row id) can hold a module made from
itself. So no query may loop on a cycle: the id walks (``ancestor_ids``, ``descendant_ids``)
use UNION, which visits each id once; the coefficient walk (``effective_weights``) carries
its path and never re-enters a module on it; and cycles are found and named
(``find_cycle``, ``graph_problems``) so that callers stop with CorruptProvenanceError.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, Text, and_, case, cast, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from registry.db.models import Derivation, DerivationInput, Module
from registry.errors import CorruptProvenanceError
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
    # ``path`` is ",id,id,...," from the root; an edge back into the path is kept as one
    # ``cycle`` row and not followed, so the walk ends even on a corrupt graph.
    walk = select(
        literal(root_id, Integer).label("id"), literal(root_digest).label("digest"),
        literal(1.0).label("a"), literal(1.0).label("b"),
        cast(literal(f",{root_id},"), Text).label("path"), cast(literal(0), Integer).label("cycle"),
    ).cte("walk", recursive=True)
    opened = or_(Derivation.method.in_(LINEAR_METHODS), walk.c.id == root_id)
    marker = cast(literal(","), Text) + cast(DerivationInput.input_id, Text) + cast(literal(","), Text)
    step = (
        select(
            DerivationInput.input_id, DerivationInput.input_digest,
            walk.c.a * DerivationInput.a, walk.c.b * DerivationInput.b,
            walk.c.path + cast(DerivationInput.input_id, Text) + cast(literal(","), Text),
            case((walk.c.path.contains(marker), 1), else_=0),
        )
        .join(walk, and_(DerivationInput.module_id == walk.c.id, walk.c.cycle == 0))
        .join(Derivation, and_(Derivation.module_id == walk.c.id, opened))
    )
    walk = walk.union_all(step)
    linear_outputs = select(Derivation.module_id).where(Derivation.method.in_(LINEAR_METHODS))
    stops_here = or_(walk.c.id.is_(None), walk.c.id.not_in(linear_outputs))
    if root_derived:
        stops_here = and_(stops_here, or_(walk.c.id.is_(None), walk.c.id != root_id))
    query = (
        select(
            walk.c.id, walk.c.digest, func.sum(walk.c.a), func.sum(walk.c.b),
            func.max(case((walk.c.cycle == 1, walk.c.path))),
        )
        .where(or_(walk.c.cycle == 1, stops_here))
        .group_by(walk.c.id, walk.c.digest)
        .order_by(walk.c.id, walk.c.digest)
    )
    rows = session.execute(query).all()
    for row in rows:
        if row[4] is not None:
            raise cycle_error(session, root_id, [int(i) for i in row[4].strip(",").split(",")])
    return [(row[0], row[1], float(row[2]), float(row[3])) for row in rows]


def find_cycle(edges: list[Any]) -> list[int] | None:
    """A cycle among ``edges`` (rows with ``module_id`` made from ``input_id``) as the ids
    along it, first id repeated at the end (``[7, 7]`` for a module made from itself); None
    when there is none. Iterative depth-first search: no recursion limit on deep graphs."""
    inputs: dict[int, list[int]] = {}
    for edge in edges:
        if edge.input_id is not None:
            inputs.setdefault(edge.module_id, []).append(edge.input_id)
    done: set[int] = set()
    for start in sorted(inputs):
        if start in done:
            continue
        path, on_path, stack = [start], {start}, [iter(inputs.get(start, []))]
        while stack:
            child = next(stack[-1], None)
            if child is None:  # every input of path[-1] explored: no cycle through it
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                stack.pop()
                continue
            if child in on_path:
                return path[path.index(child):] + [child]
            if child not in done:
                path.append(child)
                on_path.add(child)
                stack.append(iter(inputs.get(child, [])))
    return None


def cycle_error(session: Session, root_id: int, ids: list[int]) -> CorruptProvenanceError:
    """The error naming a cycle found from ``root_id`` (``ids`` ends with its first repeat)."""
    refs = refs_by_id(session, set(ids) | {root_id})
    loop = ids[ids.index(ids[-1]):-1]
    start = loop.index(root_id) if root_id in loop else loop.index(min(loop))  # one way to name it
    loop = loop[start:] + loop[:start]
    return CorruptProvenanceError(
        f"the provenance of {refs[root_id]} is corrupt: {' > '.join(refs[i] for i in loop + loop[:1])} is a cycle "
        "(a module made from itself); `pem verify --all` lists every such problem"
    )


def refs_by_id(session: Session, ids: set[int]) -> dict[int, str]:
    rows = session.execute(
        select(Module.id, Module.namespace, Module.name, Module.version).where(Module.id.in_(ids))
    )
    found = {r.id: f"{r.namespace}/{r.name}@{r.version}" for r in rows}
    return {i: found.get(i, f"module #{i}") for i in ids}


def external_label(external: dict[str, Any] | None, digest: str) -> str:
    """How an external input is named: its ref where it was made, and its Hub repo if known."""
    external = external or {}
    ref = external.get("ref") or f"sha256:{digest[:12]}"
    return f"{external['repo_id']}:{ref}" if external.get("repo_id") else f"external:{ref}"


def graph_problems(session: Session, root_id: int | None = None) -> dict[str, list[str]]:
    """What is corrupt in the lineage graph (all of it, or the ancestors of ``root_id``), per
    module ref: a module listed as its own input, an edge whose recorded digest is not that
    of the module it points at (the input's row was removed and its id given to another
    module), and cycles. Each message names the modules; none of this can happen on schema
    0005 and later, where writers re-check their inputs and row ids are never reused."""
    target = aliased(Module)
    query = (
        select(DerivationInput.module_id, DerivationInput.position, DerivationInput.input_id,
               DerivationInput.input_digest, target.digest.label("target_digest"))
        .join(target, target.id == DerivationInput.input_id)
        .order_by(DerivationInput.module_id, DerivationInput.position)
    )
    if root_id is not None:
        query = query.where(DerivationInput.module_id.in_(select(ancestor_ids(root_id).c.id)))
    edges = session.execute(query).all()
    ids = {e.module_id for e in edges} | {e.input_id for e in edges}
    refs = refs_by_id(session, ids) if ids else {}
    problems: dict[str, list[str]] = {}
    for e in edges:
        if e.input_id == e.module_id:
            problems.setdefault(refs[e.module_id], []).append(
                f"lists itself as its own input (input {e.position + 1}, made from sha256:{e.input_digest[:12]}): "
                "that input was removed while this module was composed, and its row id reused; "
                f"remove it with `pem rm {refs[e.module_id]}`"
            )
        elif e.target_digest != e.input_digest:
            problems.setdefault(refs[e.module_id], []).append(
                f"input {e.position + 1} was sha256:{e.input_digest[:12]} but points at {refs[e.input_id]} "
                f"(sha256:{e.target_digest[:12]}): that input was removed and its row id reused; "
                f"remove it with `pem rm {refs[e.module_id]}`"
            )
    remaining = [e for e in edges if e.input_id != e.module_id]
    for _ in range(len(remaining)):  # each round removes one edge of the cycle it names
        cycle = find_cycle(remaining)
        if cycle is None:
            break
        named = " > ".join(refs[i] for i in cycle)
        for module_id in set(cycle):
            problems.setdefault(refs[module_id], []).append(f"is on a provenance cycle: {named}")
        closing = (cycle[-2], cycle[-1])
        remaining = [e for e in remaining if (e.module_id, e.input_id) != closing]
    return problems
