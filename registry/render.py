"""Text renderings of lineage graphs: a readable tree, Graphviz dot, Mermaid.

Pure functions of :class:`registry.schemas.Lineage`, so API users get the same pictures as
``pem lineage``.
"""

from __future__ import annotations

import json

from registry.schemas import Lineage, LineageEdge


def _edges_by_output(lineage: Lineage) -> dict[str, list[LineageEdge]]:
    by_output: dict[str, list[LineageEdge]] = {}
    for edge in lineage.edges:
        by_output.setdefault(edge.output, []).append(edge)
    return by_output


def _coefficient(edge: LineageEdge) -> str:
    return f"{edge.b:+g}" if edge.method != "port" else "port"


def tree(lineage: Lineage) -> str:
    """The ancestor graph as an indented tree; a module already shown is not expanded again."""
    nodes = {n.ref: n for n in lineage.nodes}
    children = _edges_by_output(lineage)
    lines: list[str] = []
    shown: set[str] = set()

    def label(ref: str) -> str:
        node = nodes[ref]
        how = f"[{node.method}]" if node.method else f"({node.kind})"
        return f"{ref}  {how}"

    def walk(ref: str, prefix: str) -> None:
        edges = children.get(ref, [])
        for index, edge in enumerate(edges):
            last = index == len(edges) - 1
            repeat = edge.input in shown and edge.input in children
            suffix = "  (shown above)" if repeat else ""
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_coefficient(edge)}  {label(edge.input)}{suffix}")
            if not repeat:
                shown.add(edge.input)
                walk(edge.input, prefix + ("    " if last else "│   "))

    lines.append(label(lineage.root))
    shown.add(lineage.root)
    walk(lineage.root, "")
    return "\n".join(lines)


def dot(lineage: Lineage) -> str:
    """Graphviz: inputs point at what was made from them."""
    lines = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
    for node in lineage.nodes:
        detail = node.method or node.kind
        lines.append(f"  {json.dumps(node.ref)} [label={json.dumps(node.ref + chr(10) + detail)}];")
    for edge in lineage.edges:
        lines.append(
            f"  {json.dumps(edge.input)} -> {json.dumps(edge.output)} "
            f"[label={json.dumps(f'{edge.method} {_coefficient(edge)}')}];"
        )
    lines.append("}")
    return "\n".join(lines)


def mermaid(lineage: Lineage) -> str:
    """Mermaid flowchart (renders in GitHub markdown)."""
    ids = {node.ref: f"n{index}" for index, node in enumerate(lineage.nodes)}
    lines = ["graph LR"]
    for node in lineage.nodes:
        detail = node.method or node.kind
        lines.append(f'  {ids[node.ref]}["{node.ref}<br/>{detail}"]')
    for edge in lineage.edges:
        lines.append(f'  {ids[edge.input]} -->|"{edge.method} {_coefficient(edge)}"| {ids[edge.output]}')
    return "\n".join(lines)
