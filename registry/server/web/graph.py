"""The lineage graph of a module page: a layered layout computed here, drawn as inline SVG by
the template (nodes link to module pages; edges carry method and coefficients)."""

from __future__ import annotations

from dataclasses import dataclass

from registry.schemas import Lineage

NODE_WIDTH = 230
NODE_HEIGHT = 46
COLUMN_GAP = 40
ROW_GAP = 110
MARGIN = 20
HUB_KINDS = ("external", "pulled")  # known from the Hub: marked on the graph


@dataclass(frozen=True)
class PlacedNode:
    ref: str
    kind: str
    peft_type: str
    x: int
    y: int
    linked: bool  # a module of this registry (external inputs have no page)
    hub: bool
    root: bool


@dataclass(frozen=True)
class PlacedEdge:
    x1: int
    y1: int
    x2: int
    y2: int
    label: str


@dataclass(frozen=True)
class Graph:
    width: int
    height: int
    nodes: list[PlacedNode]
    edges: list[PlacedEdge]


def coefficient_label(method: str, a: float, b: float) -> str:
    return f"{method} a={a:g} b={b:g}" if a != b else f"{method} {b:g}"


def layout(lineage: Lineage) -> Graph:
    """Rows by depth: the root at the bottom, each input one row above the lowest module made
    from it (its longest path to the root), so every edge points down."""
    inputs_of: dict[str, list[str]] = {}
    waiting: dict[str, int] = {}  # edges to modules not yet placed
    for edge in lineage.edges:
        inputs_of.setdefault(edge.output, []).append(edge.input)
        waiting[edge.input] = waiting.get(edge.input, 0) + 1
    depth = {lineage.root: 0}
    ready = [lineage.root]
    for ref in ready:  # a module is placed once every module made from it is
        for parent in inputs_of.get(ref, []):
            depth[parent] = max(depth.get(parent, 0), depth[ref] + 1)
            waiting[parent] -= 1
            if waiting[parent] == 0:
                ready.append(parent)
    rows: dict[int, list[str]] = {}
    kinds = {node.ref: node for node in lineage.nodes}
    for node in lineage.nodes:
        rows.setdefault(depth.get(node.ref, 0), []).append(node.ref)
    top = max(rows) if rows else 0
    widest = max((len(r) for r in rows.values()), default=1)
    width = 2 * MARGIN + widest * NODE_WIDTH + (widest - 1) * COLUMN_GAP
    position: dict[str, tuple[int, int]] = {}
    for level, refs in rows.items():
        row_width = len(refs) * NODE_WIDTH + (len(refs) - 1) * COLUMN_GAP
        left = (width - row_width) // 2
        for column, ref in enumerate(refs):
            position[ref] = (left + column * (NODE_WIDTH + COLUMN_GAP), MARGIN + (top - level) * (NODE_HEIGHT + ROW_GAP))
    nodes = [
        PlacedNode(ref=ref, kind=kinds[ref].kind, peft_type=kinds[ref].peft_type, x=x, y=y,
                   linked=kinds[ref].kind != "external", hub=kinds[ref].kind in HUB_KINDS, root=ref == lineage.root)
        for ref, (x, y) in position.items()
    ]
    edges = []
    for edge in lineage.edges:
        (ix, iy), (ox, oy) = position[edge.input], position[edge.output]
        edges.append(PlacedEdge(x1=ix + NODE_WIDTH // 2, y1=iy + NODE_HEIGHT, x2=ox + NODE_WIDTH // 2, y2=oy,
                                label=coefficient_label(edge.method, edge.a, edge.b)))
    height = 2 * MARGIN + (top + 1) * NODE_HEIGHT + top * ROW_GAP
    return Graph(width=width, height=height, nodes=nodes, edges=edges)
