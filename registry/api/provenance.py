"""Provenance queries: lineage, descendants, contents, verify."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import lineage as lineage_queries
from registry.db.models import (
    Derivation,
    DerivationInput,
    HubLink,
    Module,
)
from registry.schemas import (
    Contents,
    ContentTerm,
    Descendant,
    Lineage,
    LineageEdge,
    LineageNode,
    VerifyReport,
)


class ProvenanceQueries:
    """Part of :class:`registry.Registry` (see registry/api/__init__.py)."""


    def lineage(self, ref: str) -> Lineage:
        """The ancestor graph of ``ref`` down to modules that were not derived."""
        with self._session() as session:
            root = self._resolve(session, ref)
            ids = lineage_queries.ancestor_ids(root.id)
            modules = lineage_queries.modules_by_id(session, ids)
            edges = lineage_queries.edges_into(session, ids)
            stop_at_cycle(session, root.id, edges)
            derivations = {
                row.module_id: row for row in session.execute(
                    select(Derivation.module_id, Derivation.method, Derivation.canonical)
                    .where(Derivation.module_id.in_(select(ids.c.id)))
                )
            }
            nodes = [
                LineageNode(
                    ref=m.ref, digest=m.digest, kind=m.kind, peft_type=m.peft_type,
                    method=derivations[m.id].method if m.id in derivations else None,
                    expression=derivations[m.id].canonical if m.id in derivations else None,
                )
                for m in sorted(modules.values(), key=lambda m: (m.id != root.id, m.ref))
            ]
            edge_list = []
            for e in edges:
                if e.input_id is None:  # known only from imported provenance
                    label = lineage_queries.external_label(e.external, e.input_digest)
                    if all(n.ref != label for n in nodes):
                        nodes.append(LineageNode(ref=label, digest=e.input_digest, kind="external",
                                                 peft_type=modules[e.module_id].peft_type, method=None, expression=None))
                else:
                    label = modules[e.input_id].ref
                edge_list.append(LineageEdge(output=modules[e.module_id].ref, input=label, method=e.method, a=e.a, b=e.b))
            return Lineage(root=root.ref, nodes=nodes, edges=edge_list)

    def descendants(self, ref: str) -> list[Descendant]:
        """Every module derived from ``ref``, transitively, with a shortest path to it."""
        with self._session() as session:
            root = self._resolve(session, ref)
            ids = lineage_queries.descendant_ids(root.id)
            modules = lineage_queries.modules_by_id(session, ids)
            edges = lineage_queries.edges_into(session, ids)
            stop_at_cycle(session, root.id, edges)
            paths = lineage_queries.shortest_paths(root.id, edges)
            ref_of = {i: node.ref for i, node in modules.items()}
            published: dict[int, list[str]] = {}
            for link in session.scalars(
                select(HubLink).where(HubLink.direction == "push", HubLink.module_id.in_(select(ids.c.id)))
                .order_by(HubLink.id)
            ):
                published.setdefault(link.module_id, []).append(f"{link.repo_id}@{link.revision}:{link.commit[:12]}")
            found = [
                Descendant.model_construct(
                    ref=ref_of[i], kind=modules[i].kind, depth=len(p) - 1, path=[ref_of[n] for n in p],
                    published=published.get(i, []),
                )
                for i, p in paths.items() if i != root.id
            ]
            return sorted(found, key=lambda d: (d.depth, d.ref))

    def contents(self, ref: str) -> Contents:
        """The effective weight of each non-derived ancestor inside ``ref``; modules made by a
        non-linear method are opaque terms with their own contents nested."""
        with self._session() as session:
            root = self._resolve(session, ref)
            linear = root.derivation is None or root.derivation.method in lineage_queries.LINEAR_METHODS
            return Contents(root=root.ref, root_linear=linear, terms=self._content_terms(session, root.id, ()))

    def _content_terms(self, session: Session, root_id: int, outer: tuple[int, ...]) -> list[ContentTerm]:
        """``outer``: the opaque modules whose contents are being listed around this one; a
        module among them is a cycle through non-linear steps, which no single walk sees."""
        if root_id in outer:
            ids = list(outer[outer.index(root_id):]) + [root_id]
            raise lineage_queries.cycle_error(session, outer[0], ids)
        weights = lineage_queries.effective_weights(session, root_id)
        ids = [module_id for module_id, _, _, _ in weights if module_id is not None]
        modules = {m.id: m for m in session.scalars(select(Module).where(Module.id.in_(ids)))}
        derived = set(session.scalars(select(Derivation.module_id).where(Derivation.module_id.in_(ids))))
        externals = {
            row.input_digest: row.external for row in session.execute(
                select(DerivationInput.input_digest, DerivationInput.external).where(
                    DerivationInput.input_id.is_(None),
                    DerivationInput.input_digest.in_([d for i, d, _, _ in weights if i is None]),
                )
            )
        }
        terms = []
        for module_id, digest, a, b in weights:
            if module_id is None:
                label = lineage_queries.external_label(externals.get(digest), digest)
                terms.append(ContentTerm(ref=label, digest=digest, kind="external", a=a, b=b, opaque=False))
                continue
            module = modules[module_id]
            opaque = module_id in derived and module_id != root_id
            terms.append(ContentTerm(
                ref=module.ref, digest=module.digest, kind=module.kind, a=a, b=b, opaque=opaque,
                contents=self._content_terms(session, module_id, outer + (root_id,)) if opaque else None,
            ))
        return sorted(terms, key=lambda t: t.ref)

    def verify(self, ref: str | None = None, *, progress: Any = None) -> VerifyReport:
        """Check blobs against their digests and re-run derivations (all modules when ``ref``
        is None). Re-derivations are computed in a scratch store and discarded; the one write is
        the tensors' largest magnitudes of modules stored before pem recorded them."""
        from registry.adapters import adapter_type
        from registry.adapters.base import has_magnitudes
        from registry.verify import verify_modules

        with self._session() as session:
            if ref is None:
                modules = list(session.scalars(select(Module).order_by(Module.id)))
                graph = lineage_queries.graph_problems(session)
            else:
                modules = [self._resolve(session, ref)]
                graph = lineage_queries.graph_problems(session, modules[0].id)
            report = verify_modules(self, session, modules, progress, graph)
            unmeasured = [m.digest for m in modules
                          if adapter_type(m.peft_type).composable and not has_magnitudes(m.layers)]
        # Modules stored before magnitudes were recorded get them now (blobs that fail their
        # digest are skipped: the report names them).
        recorded = self._record_magnitudes(unmeasured, strict=False)
        if recorded:
            report.notes.append(
                f"recorded the largest tensor values of {len(recorded)} blob(s) stored before pem recorded them"
            )
        return report


def stop_at_cycle(session: Session, root_id: int, edges: list[Any]) -> None:
    """Raise CorruptProvenanceError naming a cycle among ``edges``, if there is one."""
    cycle = lineage_queries.find_cycle(edges)
    if cycle is not None:
        raise lineage_queries.cycle_error(session, root_id, cycle)
