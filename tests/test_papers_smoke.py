"""The papers-in-miniature example (examples/papers) end to end, with its --smoke settings:
every arm reports finite numbers over the seeds it ran, and every module it composed or
ported is in the registry with its provenance and lineage."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is not an installed package
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from examples.papers import main

    tmp = tmp_path_factory.mktemp("papers")
    lines: list[str] = []
    results = main(smoke=True, home=tmp / "home", out=tmp / "results.json", figure=tmp / "figure.png",
                   log=lines.append)
    return results, tmp, lines


def _check_stat(stat, seeds: int, where: str) -> None:
    assert set(stat) >= {"mean", "std", "n", "values"}, where
    assert stat["n"] == seeds == len(stat["values"]), where
    for value in (stat["mean"], stat["std"], *stat["values"]):
        assert isinstance(value, float) and math.isfinite(value), where


def test_every_arm_has_results_of_the_right_shape(run):
    results, tmp, lines = run
    seeds = results["meta"]["seeds"]
    assert seeds >= 1 and results["meta"]["smoke"] is True
    exp = results["experiments"]
    assert set(exp) == {"distribution", "multitask", "unlearning", "porting"}

    d = exp["distribution"]
    assert d["seeds"] == seeds
    assert set(d["arms"]) == {"m1 (domain 1)", "m2 (domain 2)", "0.5*m1+0.5*m2 module", "0.5*m1+0.5*m2 exact",
                              "union-trained (reference)"}
    for arm, splits in d["arms"].items():
        assert set(splits) == {"domain 1", "domain 2", "union"}
        for split, stat in splits.items():
            _check_stat(stat, seeds, f"distribution/{arm}/{split}")
            assert 0.0 <= stat["mean"] <= 1.0
    _check_stat(d["deviation"], seeds, "distribution/deviation")
    assert d["deviation"]["mean"] >= 0.0
    _check_stat(d["a_drift"], seeds, "distribution/a_drift")

    m = exp["multitask"]
    single = {"host (no module)", "sentiment module", "topic module", "0.5*sent+0.5*topic module"}
    assert set(m["lora"]) == single | {"0.5*sent+0.5*topic exact"}
    _check_stat(m["lora deviation"], seeds, "multitask/lora deviation")
    _check_stat(m["lora a_drift"], seeds, "multitask/lora a_drift")
    assert set(m["ia3"]) == single
    for kind in ("lora", "ia3"):
        for arm, tasks in m[kind].items():
            assert set(tasks) == {"sentiment", "topic"}
            for task, stat in tasks.items():
                _check_stat(stat, seeds, f"multitask/{kind}/{arm}/{task}")

    u = exp["unlearning"]
    lambdas = u["lambdas"]
    assert len(lambdas) >= 2
    for kind, methods in (("lora", ("exact", "module")), ("ia3", ("module",))):
        negated = {f"host - {lam:g}*m {meth}" for meth in methods for lam in lambdas}
        expected = {"host", "host + m (fine-tuned)"} | negated
        assert set(u[kind]) == expected
        for arm, metrics in u[kind].items():
            assert set(metrics) == {"marked rate", "clean perplexity", "effect scale"}
            for metric, stat in metrics.items():
                _check_stat(stat, seeds, f"unlearning/{kind}/{arm}/{metric}")
            assert 0.0 <= metrics["marked rate"]["mean"] <= 1.0 and metrics["clean perplexity"]["mean"] >= 1.0
        # the effect the registry's expression carries: exact is linear in lam, module quadratic (LoRA)
        for lam in lambdas:
            assert u[kind][f"host - {lam:g}*m module"]["effect scale"]["mean"] == pytest.approx(
                -(lam ** 2) if kind == "lora" else -lam, rel=1e-3)
            if kind == "lora":
                assert u[kind][f"host - {lam:g}*m exact"]["effect scale"]["mean"] == pytest.approx(-lam, rel=1e-3)

    p = exp["porting"]
    budgets = p["budgets"]
    assert budgets[0] == 0 and len(budgets) >= 2
    for kind in ("lora", "ia3"):
        _check_stat(p[kind]["source on host X"], seeds, f"porting/{kind}/source")
        assert set(p[kind]["arms"]) == {"ported", "default init", "sampled init"}
        for arm, curve in p[kind]["arms"].items():
            assert set(curve) == {str(b) for b in budgets}
            for b, stat in curve.items():
                _check_stat(stat, seeds, f"porting/{kind}/{arm}/{b}")

    assert set(results["tables"]) == set(exp) == set(results["verdicts"])
    assert (tmp / "results.json").is_file()
    assert any("wall time" in line for line in lines)


def test_composed_and_ported_modules_are_registered_with_provenance(run):
    from registry import Registry

    results, _, _ = run
    made = results["registry"]
    seeds = results["meta"]["seeds"]
    lambdas = results["experiments"]["unlearning"]["lambdas"]
    # 2 (distribution) + 3 (multitask: LoRA module+exact, IA3 module) + 3*len(lambdas) (unlearning) per seed
    assert len(made["composed"]) == seeds * (2 + 3 + 3 * len(lambdas))
    assert len(made["ported"]) == seeds * 2
    assert made["verify"]["ok"], made["verify"]  # `Registry.verify()` at the end of the run
    assert made["verify"]["rederived"] >= len(made["composed"])
    with Registry.open(made["home"], database_url=made["database_url"], store=made["store"]) as registry:
        for entry in made["composed"]:
            details = registry.get(entry["ref"])
            assert details.kind == "derived"
            assert details.provenance is not None, entry["ref"]
            assert details.provenance.method == entry["method"]
            assert details.provenance.expression == entry["expression"]
            assert sorted(i.ref for i in details.provenance.inputs) == sorted(entry["inputs"])
            lineage = registry.lineage(entry["ref"])
            assert lineage.root == entry["ref"]
            named = {e.input for e in lineage.edges if e.output == entry["ref"]}
            assert named == set(entry["inputs"]), entry["ref"]
            assert {n.ref for n in lineage.nodes} >= set(entry["inputs"])
        for entry in made["ported"]:
            details = registry.get(entry["ref"])
            assert details.kind == "ported"
            assert details.base_model == entry["to"]
            assert details.provenance is not None and details.provenance.method == "port"
            assert [i.ref for i in details.provenance.inputs] == [entry["from"]]
            assert registry.get(entry["from"]).digest == details.digest  # the same tensors, on another host
            assert {e.input for e in registry.lineage(entry["ref"]).edges} == {entry["from"]}
        trained = {m.ref for m in registry.list(kind="trained")}
        assert {e["ref"] for e in made["trained"]} <= trained
