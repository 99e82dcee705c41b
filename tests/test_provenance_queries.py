"""Provenance queries over multi-level derivations: lineage (API, tree, dot, mermaid, JSON),
descendants, contents, ``list --derived-from`` / ``--kind``, and ``rm`` of a module that
others were derived from.

The catalog every test starts from (built by :func:`build_catalog`, creation order = ids)::

    lab/a, lab/b  trained LoRA adapters (tiny llama, r=4)
    lab/c = 0.5*lab/a + 0.5*lab/b      exact
    lab/d = lab/c - 0.2*lab/a          exact    (lab/a used twice: directly and inside lab/c)
    lab/e = 2*lab/d + lab/c            exact    (depth 3: e -> d -> c -> a)
    lab/m = 0.5*lab/a - lab/b          module
    lab/s = lab/c + lab/m              svd, rank 4 (non-linear: an opaque node)
    lab/f = lab/s - 0.5*lab/m          exact    (depth 3: f -> s -> c -> a; lab/m used twice)

Every expected coefficient, depth and path below is worked out by hand from this table
(SEMANTICS.md section 2: ``b`` multiplies signed scalars along a path and adds over paths,
``a`` does the same with absolute values); none is computed by the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import make_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

A, B, C, D, E, M, S, F = (f"lab/{x}@1" for x in "abcdemsf")
TRAINED = {A, B}
DERIVED = {C, D, E, M, S, F}

# (output, input, method, a, b) of every derivation edge, written from the expressions above.
EDGES = {
    (C, A, "exact", 0.5, 0.5), (C, B, "exact", 0.5, 0.5),          # 0.5*a + 0.5*b
    (D, C, "exact", 1.0, 1.0), (D, A, "exact", 0.2, -0.2),         # c - 0.2*a
    (E, D, "exact", 2.0, 2.0), (E, C, "exact", 1.0, 1.0),          # 2*d + c
    (M, A, "module", 0.5, 0.5), (M, B, "module", 1.0, -1.0),       # 0.5*a - b
    (S, C, "svd", 1.0, 1.0), (S, M, "svd", 1.0, 1.0),              # c + m
    (F, S, "exact", 1.0, 1.0), (F, M, "exact", 0.5, -0.5),         # s - 0.5*m
}
METHOD = {C: "exact", D: "exact", E: "exact", M: "module", S: "svd", F: "exact"}


def inputs_of(ref: str) -> set[str]:
    return {i for o, i, *_ in EDGES if o == ref}


# --- the catalog ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("provenance-adapters")
    return SimpleNamespace(a=make_lora(root / "a", seed=11), b=make_lora(root / "b", seed=12))


def build_catalog(registry, folders: SimpleNamespace) -> dict[str, object]:
    """Register lab/a and lab/b and derive the rest (see the module docstring)."""
    made = {
        A: registry.add(folders.a, "lab/a"),
        B: registry.add(folders.b, "lab/b"),
        C: registry.compose("0.5*lab/a + 0.5*lab/b", "lab/c", method="exact"),
        D: registry.compose("lab/c - 0.2*lab/a", "lab/d", method="exact"),
        E: registry.compose("2*lab/d + lab/c", "lab/e", method="exact"),
        M: registry.compose("0.5*lab/a - lab/b", "lab/m", method="module"),
        S: registry.compose("lab/c + lab/m", "lab/s", method="svd", rank=4),
        F: registry.compose("lab/s - 0.5*lab/m", "lab/f", method="exact"),
    }
    assert {ref: info.ref for ref, info in made.items()} == {ref: ref for ref in made}
    return made


@pytest.fixture
def catalog(registry, folders):
    build_catalog(registry, folders)
    return registry


def approx(x: float):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# --- lineage: the API ----------------------------------------------------------------------------


def edge_set(lineage) -> set[tuple]:
    return {(e.output, e.input, e.method, round(e.a, 12), round(e.b, 12)) for e in lineage.edges}


def expected_edges(*outputs: str) -> set[tuple]:
    return {(o, i, m, round(a, 12), round(b, 12)) for o, i, m, a, b in EDGES if o in outputs}


def test_lineage_of_a_depth_3_exact_derivation(catalog):
    graph = catalog.lineage("lab/e")
    assert graph.root == E
    refs = [n.ref for n in graph.nodes]
    assert refs[0] == E
    # e = 2*d + c, d = c - 0.2*a, c = 0.5*a + 0.5*b: c and a are reached twice, listed once.
    assert sorted(refs) == sorted([E, D, C, A, B])
    assert len(graph.edges) == 6
    assert edge_set(graph) == expected_edges(E, D, C)
    nodes = {n.ref: n for n in graph.nodes}
    for ref in (E, D, C):
        assert (nodes[ref].kind, nodes[ref].method) == ("derived", "exact")
        assert nodes[ref].expression
    for ref in (A, B):
        assert (nodes[ref].kind, nodes[ref].method, nodes[ref].expression) == ("trained", None, None)
    assert nodes[D].expression.replace(" ", "") == "lab/c@1-0.2*lab/a@1"


def test_lineage_through_mixed_methods(catalog):
    graph = catalog.lineage("lab/f")
    assert graph.root == F
    refs = [n.ref for n in graph.nodes]
    assert refs[0] == F
    # f = s - 0.5*m, s = svd(c + m), m = 0.5*a - b, c = 0.5*a + 0.5*b: m is used twice.
    assert sorted(refs) == sorted([F, S, M, C, A, B])
    assert len(graph.edges) == 8
    assert edge_set(graph) == expected_edges(F, S, M, C)
    assert {n.ref: n.method for n in graph.nodes} == {F: "exact", S: "svd", M: "module", C: "exact", A: None, B: None}


def test_lineage_of_a_trained_module_is_itself(catalog):
    graph = catalog.lineage("lab/a")
    assert graph.root == A
    assert [n.ref for n in graph.nodes] == [A]
    assert graph.edges == []


def test_lineage_of_a_module_used_twice_in_one_expression(registry, folders):
    registry.add(folders.a, "lab/a")
    registry.add(folders.b, "lab/b")
    registry.compose("lab/a + 0.5*(lab/b - lab/a)", "lab/x", method="exact")
    graph = registry.lineage("lab/x")
    # SEMANTICS.md section 2: x + 0.5*(y - x) gives x: (a = 1 + 0.5 = 1.5, b = 1 - 0.5 = 0.5),
    # y: (a = 0.5, b = 0.5). One edge per distinct input.
    assert edge_set(graph) == {("lab/x@1", A, "exact", 1.5, 0.5), ("lab/x@1", B, "exact", 0.5, 0.5)}
    assert sorted(n.ref for n in graph.nodes) == sorted(["lab/x@1", A, B])


# --- lineage: the tree ---------------------------------------------------------------------------

TREE_LINE = re.compile(
    r"^(?P<prefix>(?:│   |    )*)(?:├── |└── )(?P<coef>[+-][0-9.e+-]+)  (?P<ref>\S+)  "
    r"(?P<how>\[\w+\]|\(\w+\))(?P<shown>  \(shown above\))?$"
)


def parse_tree(text: str) -> tuple[str, list[dict]]:
    """(first line, [{depth, coef, ref, how, shown, parent index}]) from the tree rendering."""
    lines = text.rstrip("\n").split("\n")
    items: list[dict] = []
    stack: list[int] = []  # index of the last item at each depth
    for line in lines[1:]:
        match = TREE_LINE.match(line)
        assert match, f"unexpected tree line {line!r} in\n{text}"
        depth = len(match["prefix"]) // 4 + 1
        parent = -1 if depth == 1 else stack[depth - 2]
        stack[depth - 1:] = [len(items)]
        items.append(dict(depth=depth, coef=match["coef"], ref=match["ref"], how=match["how"],
                          shown=bool(match["shown"]), parent=parent))
    return lines[0], items


def check_tree(text: str, root: str, ancestors: set[str], n_lines: int) -> list[dict]:
    first, items = parse_tree(text)
    assert first == f"{root}  [{METHOD[root]}]"
    assert len(items) + 1 == n_lines, text
    for index, item in enumerate(items):
        parent = root if item["parent"] == -1 else items[item["parent"]]["ref"]
        edge = next(e for e in EDGES if e[0] == parent and e[1] == item["ref"])
        assert item["coef"] == f"{edge[4]:+g}"
        assert item["how"] == (f"[{METHOD[item['ref']]}]" if item["ref"] in DERIVED else "(trained)")
        children = [i for i in items if i["parent"] == index]
        if item["ref"] in DERIVED and not item["shown"]:
            assert {c["ref"] for c in children} == inputs_of(item["ref"]), text
        else:
            assert children == [], text
    for ref in ancestors & DERIVED:
        occurrences = [i for i, item in enumerate(items) if item["ref"] == ref]
        expanded = [i for i in occurrences if not items[i]["shown"]]
        assert len(expanded) == 1, f"{ref} expanded {len(expanded)} times:\n{text}"
        assert expanded[0] == occurrences[0], f"{ref} marked (shown above) before it was shown:\n{text}"
    return items


def test_tree_expands_a_module_used_twice_only_once(catalog, run_pem):
    result = run_pem("lineage", "lab/e")
    assert result.exit_code == 0, result.output
    # e: d (c (a, b), a) and c again, in digest order: 1 + 2 inputs of e + 2 of its first
    # expanded child + 2 of c = 7 lines; c appears twice, once "(shown above)".
    items = check_tree(result.stdout, E, {D, C, A, B}, n_lines=7)
    c_lines = [i for i in items if i["ref"] == C]
    assert len(c_lines) == 2 and [i["shown"] for i in c_lines] == [False, True]
    assert result.stdout.count("(shown above)") == 1


def test_tree_through_mixed_methods(catalog, run_pem):
    result = run_pem("lineage", "lab/f")
    assert result.exit_code == 0, result.output
    # f: s (c (a, b), m (a, b)) and m again: 1 + 2 + 2 + 2 + 2 = 9 lines; m once "(shown above)".
    items = check_tree(result.stdout, F, {S, M, C, A, B}, n_lines=9)
    assert [i["shown"] for i in items if i["ref"] == M] == [False, True]
    assert result.stdout.count("(shown above)") == 1
    assert "[svd]" in result.stdout and "[module]" in result.stdout


def test_tree_of_a_trained_module_is_one_line(catalog, run_pem):
    result = run_pem("lineage", "lab/a")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{A}  (trained)\n"


# --- lineage: dot, mermaid, JSON ------------------------------------------------------------------

# f's edges as Graphviz lines, written out by hand: input -> output, "method signed-b".
F_DOT_EDGES = {
    '"lab/s@1" -> "lab/f@1" [label="exact +1"];',
    '"lab/m@1" -> "lab/f@1" [label="exact -0.5"];',
    '"lab/c@1" -> "lab/s@1" [label="svd +1"];',
    '"lab/m@1" -> "lab/s@1" [label="svd +1"];',
    '"lab/a@1" -> "lab/m@1" [label="module +0.5"];',
    '"lab/b@1" -> "lab/m@1" [label="module -1"];',
    '"lab/a@1" -> "lab/c@1" [label="exact +0.5"];',
    '"lab/b@1" -> "lab/c@1" [label="exact +0.5"];',
}


def test_dot_output(catalog, run_pem):
    result = run_pem("lineage", "lab/f", "--format", "dot")
    assert result.exit_code == 0, result.output
    text = result.stdout.strip()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("digraph") and lines[0].endswith("{")
    assert lines[-1] == "}"
    assert text.count("{") == text.count("}") == 1
    edge_lines = [line for line in lines if "->" in line]
    assert len(edge_lines) == 8
    assert set(edge_lines) == F_DOT_EDGES
    node_lines = [line for line in lines if line.startswith('"') and "->" not in line]
    declared = [re.match(r'"([^"]+)" \[label=', line)[1] for line in node_lines]
    assert sorted(declared) == sorted([F, S, M, C, A, B])
    for line in lines[1:-1]:
        assert line.endswith(";"), line


def test_mermaid_output(catalog, run_pem):
    result = run_pem("lineage", "lab/f", "--format", "mermaid")
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.strip().splitlines()]
    assert lines[0].startswith("graph")
    ids: dict[str, str] = {}
    for line in lines[1:]:
        node = re.fullmatch(r'(\w+)\["([^"<]+)<br/>(\w+)"\]', line)
        if node:
            ids[node[1]] = node[2]
    assert sorted(ids.values()) == sorted([F, S, M, C, A, B])
    edge_lines = [line for line in lines if "-->" in line]
    assert len(edge_lines) == 8
    edges = set()
    for line in edge_lines:
        match = re.fullmatch(r'(\w+) -->\|"(\w+) ([+-][0-9.]+)"\| (\w+)', line)
        assert match, line
        edges.add((ids[match[4]], ids[match[1]], match[2], match[3]))
    assert edges == {(o, i, m, f"{b:+g}") for o, i, m, a, b in EDGES if o in {F, S, M, C}}


def test_lineage_json_matches_the_api(catalog, run_pem):
    result = run_pem("lineage", "lab/e", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["root"] == E
    assert data == catalog.lineage("lab/e").model_dump(mode="json")
    assert {(e["output"], e["input"], e["method"], round(e["a"], 12), round(e["b"], 12)) for e in data["edges"]} == (
        expected_edges(E, D, C)
    )
    assert sorted(n["ref"] for n in data["nodes"]) == sorted([E, D, C, A, B])


# --- descendants ---------------------------------------------------------------------------------

# Every shortest path, by hand, from the module asked about (depth = len(path) - 1).
SHORTEST = {
    A: {C: [[A, C]], D: [[A, D]], M: [[A, M]], E: [[A, C, E], [A, D, E]], S: [[A, C, S], [A, M, S]],
        F: [[A, M, F]]},
    B: {C: [[B, C]], M: [[B, M]], D: [[B, C, D]], E: [[B, C, E]], S: [[B, C, S], [B, M, S]], F: [[B, M, F]]},
    C: {D: [[C, D]], E: [[C, E]], S: [[C, S]], F: [[C, S, F]]},
    M: {S: [[M, S]], F: [[M, F]]},
    D: {E: [[D, E]]},
    S: {F: [[S, F]]},
}


@pytest.mark.parametrize("ref", [A, B, C, M])
def test_descendants_with_depth_and_a_shortest_path(catalog, ref):
    found = catalog.descendants(ref.removesuffix("@1"))
    expected = SHORTEST[ref]
    assert sorted(d.ref for d in found) == sorted(expected)
    assert len(found) == len(expected)
    for item in found:
        paths = expected[item.ref]
        assert item.kind == "derived"
        assert item.path in paths, (item.ref, item.path)
        assert item.depth == len(paths[0]) - 1
    assert [(d.depth, d.ref) for d in found] == sorted((d.depth, d.ref) for d in found)


def test_descendants_of_a_leaf(catalog):
    assert catalog.descendants("lab/f") == []
    assert catalog.descendants("lab/e") == []


def test_descendants_cli(catalog, run_pem):
    result = run_pem("descendants", "lab/c")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert sorted(lines) == sorted([
        f"{D}  (derived, depth 1)  via {C} > {D}",
        f"{E}  (derived, depth 1)  via {C} > {E}",
        f"{S}  (derived, depth 1)  via {C} > {S}",
        f"{F}  (derived, depth 2)  via {C} > {S} > {F}",
    ])
    leaf = run_pem("descendants", "lab/f")
    assert leaf.exit_code == 0, leaf.output
    assert leaf.stdout.strip() == f"nothing was derived from {F}"
    as_json = run_pem("descendants", "lab/m", "--json")
    assert as_json.exit_code == 0, as_json.output
    assert {(d["ref"], d["depth"], tuple(d["path"])) for d in json.loads(as_json.stdout)} == {
        (S, 1, (M, S)), (F, 1, (M, F)),
    }


def test_queries_follow_the_version_that_was_used(catalog):
    # A second version of lab/c, made differently: d, e and s were made from lab/c@1.
    C2 = catalog.compose("lab/a - lab/b", "lab/c", method="exact", new_version=True).ref
    assert C2 == "lab/c@2"
    assert catalog.descendants("lab/c") == []  # the latest version, c@2, has none
    assert sorted(d.ref for d in catalog.descendants("lab/c@1")) == sorted(SHORTEST[C])
    assert sorted(d.ref for d in catalog.descendants("lab/a")) == sorted([*SHORTEST[A], C2])
    assert C2 not in {n.ref for n in catalog.lineage("lab/e").nodes}
    assert edge_set(catalog.lineage("lab/e")) == expected_edges(E, D, C)
    assert refs(catalog.list(derived_from="lab/c@1")) == sorted([D, E, F, S])
    digest_ref = "sha256:" + catalog.resolve("lab/m").digest[:16]
    assert sorted(d.ref for d in catalog.descendants(digest_ref)) == sorted(SHORTEST[M])


# --- contents ------------------------------------------------------------------------------------


def terms_of(terms) -> dict[str, tuple[float, float, bool]]:
    return {t.ref: (t.a, t.b, t.opaque) for t in terms}


def assert_terms(terms, expected: dict[str, tuple[float, float, bool]]) -> None:
    assert [t.ref for t in terms] == sorted(expected)
    for term in terms:
        a, b, opaque = expected[term.ref]
        assert (term.a, term.b, term.opaque) == (approx(a), approx(b), opaque), term.ref
        assert term.kind == ("trained" if term.ref in TRAINED else "derived")


def test_contents_of_the_issue_example(catalog):
    result = catalog.contents("lab/d")
    assert result.root == D and result.root_linear is True
    # d = c - 0.2*a with c = 0.5*a + 0.5*b:
    #   a: b = 1*0.5 + (-0.2) = 0.3,  a = 1*0.5 + 0.2 = 0.7
    #   b: b = 1*0.5 = 0.5,           a = 1*0.5 = 0.5
    assert_terms(result.terms, {A: (0.7, 0.3, False), B: (0.5, 0.5, False)})
    assert all(t.contents is None for t in result.terms)


def test_contents_of_a_depth_3_derivation(catalog):
    result = catalog.contents("lab/e")
    assert result.root == E and result.root_linear is True
    # e = 2*d + c; d contains a (a=0.7, b=0.3), b (0.5, 0.5); c contains a (0.5, 0.5), b (0.5, 0.5):
    #   a: b = 2*0.3 + 0.5 = 1.1,  a = 2*0.7 + 0.5 = 1.9
    #   b: b = 2*0.5 + 0.5 = 1.5,  a = 2*0.5 + 0.5 = 1.5
    # (check: e = 3c - 0.4a = 1.5a + 1.5b - 0.4a = 1.1a + 1.5b)
    assert_terms(result.terms, {A: (1.9, 1.1, False), B: (1.5, 1.5, False)})


def test_contents_of_a_module_method_derivation(catalog):
    result = catalog.contents("lab/m")
    assert result.root_linear is True
    # m = 0.5*a - b: a (a=0.5, b=0.5), b (a=|-1|=1, b=-1)
    assert_terms(result.terms, {A: (0.5, 0.5, False), B: (1.0, -1.0, False)})


def test_contents_of_an_svd_root_lists_its_inputs(catalog):
    result = catalog.contents("lab/s")
    assert result.root == S and result.root_linear is False
    # s = svd(c + m), c = 0.5*a + 0.5*b, m = 0.5*a - b:
    #   a: b = 0.5 + 0.5 = 1.0,   a = 0.5 + 0.5 = 1.0
    #   b: b = 0.5 + (-1) = -0.5, a = 0.5 + 1 = 1.5
    assert_terms(result.terms, {A: (1.0, 1.0, False), B: (1.5, -0.5, False)})


def test_contents_stop_at_an_svd_node(catalog):
    result = catalog.contents("lab/f")
    assert result.root == F and result.root_linear is True
    # f = s - 0.5*m; s is opaque (svd): s (a=1, b=1) with its own contents nested;
    # m = 0.5*a - b is linear and opened with factor -0.5 (the m inside s is not counted here):
    #   a: b = -0.5*0.5 = -0.25, a = 0.5*0.5 = 0.25
    #   b: b = -0.5*(-1) = 0.5,   a = 0.5*1 = 0.5
    assert_terms(result.terms, {A: (0.25, -0.25, False), B: (0.5, 0.5, False), S: (1.0, 1.0, True)})
    nested = next(t for t in result.terms if t.ref == S).contents
    assert nested is not None
    assert_terms(nested, {A: (1.0, 1.0, False), B: (1.5, -0.5, False)})  # as contents of lab/s, above
    assert all(t.contents is None for t in result.terms if t.ref != S)


def test_contents_with_opaque_nodes_reached_twice_and_nested(catalog):
    G, S2, H = "lab/g@1", "lab/s2@1", "lab/h@1"
    catalog.compose("lab/f + 2*lab/s", "lab/g", method="exact")
    catalog.compose("lab/s + lab/a", "lab/s2", method="svd", rank=4)
    catalog.compose("lab/s2 - lab/s", "lab/h", method="exact")
    s_inside = {A: (1.0, 1.0, False), B: (1.5, -0.5, False)}  # contents of lab/s, as above

    # g = f + 2*s: f opens to a (0.25, -0.25), b (0.5, 0.5), s (1, 1); s again directly:
    #   s: b = 1 + 2 = 3, a = 1 + 2 = 3
    g = catalog.contents("lab/g")
    assert g.root == G and g.root_linear is True
    assert_terms(g.terms, {A: (0.25, -0.25, False), B: (0.5, 0.5, False), S: (3.0, 3.0, True)})
    assert_terms(next(t for t in g.terms if t.ref == S).contents, s_inside)

    # s2 = svd(s + a): an svd root lists its inputs; s stays opaque inside it.
    s2 = catalog.contents("lab/s2")
    assert s2.root_linear is False
    assert_terms(s2.terms, {A: (1.0, 1.0, False), S: (1.0, 1.0, True)})
    assert_terms(next(t for t in s2.terms if t.ref == S).contents, s_inside)

    # h = s2 - s: two opaque terms, s2 (1, 1) and s (a=|-1|=1, b=-1), each with its contents,
    # s nested twice deep inside s2.
    h = catalog.contents("lab/h")
    assert h.root_linear is True
    assert_terms(h.terms, {S2: (1.0, 1.0, True), S: (1.0, -1.0, True)})
    in_s2 = next(t for t in h.terms if t.ref == S2).contents
    assert_terms(in_s2, {A: (1.0, 1.0, False), S: (1.0, 1.0, True)})
    assert_terms(next(t for t in in_s2 if t.ref == S).contents, s_inside)
    assert_terms(next(t for t in h.terms if t.ref == S).contents, s_inside)


def test_contents_of_a_trained_module_is_itself(catalog):
    result = catalog.contents("lab/a")
    assert result.root == A and result.root_linear is True
    assert_terms(result.terms, {A: (1.0, 1.0, False)})


def test_contents_cli(catalog, run_pem):
    result = run_pem("contents", "lab/d")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{D} contains:",
        f"  +0.3  {A}  (a=0.7, trained)",
        f"  +0.5  {B}  (a=0.5, trained)",
    ]
    svd = run_pem("contents", "lab/s")
    assert svd.exit_code == 0, svd.output
    assert svd.stdout.splitlines()[0] == f"{S} (non-linear method: it approximates) contains:"
    nested = run_pem("contents", "lab/f")
    assert nested.exit_code == 0, nested.output
    assert nested.stdout.splitlines() == [
        f"{F} contains:",
        f"  -0.25  {A}  (a=0.25, trained)",
        f"  +0.5  {B}  (a=0.5, trained)",
        f"  +1  {S}  (a=1, derived)  (opaque: non-linear; its contents below)",
        f"      +1  {A}  (a=1, trained)",
        f"      -0.5  {B}  (a=1.5, trained)",
    ]
    as_json = run_pem("contents", "lab/e", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["root"] == E and data["root_linear"] is True
    assert {t["ref"]: (round(t["a"], 12), round(t["b"], 12)) for t in data["terms"]} == {A: (1.9, 1.1), B: (1.5, 1.5)}


# --- list --derived-from / --kind ----------------------------------------------------------------


def refs(modules) -> list[str]:
    return [m.ref for m in modules]


def test_list_derived_from_is_transitive_and_excludes_the_module(catalog):
    assert refs(catalog.list(derived_from="lab/a")) == sorted([C, D, E, F, M, S])
    assert refs(catalog.list(derived_from="lab/b")) == sorted([C, D, E, F, M, S])
    assert refs(catalog.list(derived_from="lab/c")) == sorted([D, E, F, S])
    assert refs(catalog.list(derived_from="lab/m")) == sorted([F, S])
    assert refs(catalog.list(derived_from="lab/d@1")) == [E]
    assert refs(catalog.list(derived_from="lab/f")) == []
    assert refs(catalog.list(derived_from="lab/m", kind="derived")) == sorted([F, S])


def test_list_by_kind(catalog):
    assert refs(catalog.list(kind="derived")) == sorted(DERIVED)
    assert refs(catalog.list(kind="trained")) == sorted(TRAINED)


def test_list_derived_from_and_kind_cli(catalog, run_pem):
    result = run_pem("list", "--derived-from", "lab/c", "--json")
    assert result.exit_code == 0, result.output
    assert [m["ref"] for m in json.loads(result.stdout)] == sorted([D, E, F, S])
    trained = run_pem("list", "--kind", "trained", "--json")
    assert [m["ref"] for m in json.loads(trained.stdout)] == sorted(TRAINED)
    derived = run_pem("list", "--kind", "derived", "--json")
    assert [m["ref"] for m in json.loads(derived.stdout)] == sorted(DERIVED)
    table = run_pem("list", "--derived-from", "lab/s")
    assert table.exit_code == 0, table.output
    assert F in table.stdout and S not in table.stdout.replace(F, "")
    empty = run_pem("list", "--derived-from", "lab/f")
    assert empty.exit_code == 0 and empty.stdout.strip() == "no modules match"


# --- rm of a module with descendants ---------------------------------------------------------------


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest[:2] / digest[2:]


def test_remove_refused_while_descendants_exist_then_top_down(catalog, home):
    from registry.errors import ModuleInUseError

    digest_a = catalog.resolve("lab/a").digest
    with pytest.raises(ModuleInUseError, match=r"cannot remove lab/a@1: .*lab/c@1.*lab/d@1.*lab/m@1"):
        catalog.remove(A)
    with pytest.raises(ModuleInUseError, match=r"cannot remove lab/c@1"):
        catalog.remove(C)
    assert len(catalog.list()) == 8  # nothing removed
    assert blob_path(home, digest_a).is_file()
    for ref in (F, S, E, D, C, M):  # top-down: each has no descendants left when removed
        assert catalog.remove(ref).ref == ref
    assert catalog.descendants("lab/a") == []
    assert catalog.remove(A).ref == A
    assert not blob_path(home, digest_a).exists()
    assert refs(catalog.list()) == [B]


def test_remove_refused_through_the_cli(catalog, run_pem):
    result = run_pem("rm", M)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot remove lab/m@1")
    assert "lab/f@1" in result.stderr and "lab/s@1" in result.stderr
    assert M in refs(catalog.list())
    for ref in (F, S):
        assert run_pem("rm", ref).exit_code == 0
    removed = run_pem("rm", M)
    assert removed.exit_code == 0, removed.output
    assert removed.stdout.strip() == f"removed {M}"
    assert catalog.descendants("lab/a") and M not in refs(catalog.list())
