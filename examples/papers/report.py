"""Tables, verdicts and the figure, from the results dictionary alone (so they can be
redrawn from results.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pm(s: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"**{title}**", "", line(header), sep, *[line(r) for r in rows]])


# --- tables -----------------------------------------------------------------------------------


def tables(results: dict[str, Any]) -> dict[str, str]:
    exp = results["experiments"]
    out = {}
    n = results["meta"]["seeds"]
    d = exp["distribution"]
    out["distribution"] = table(
        f"1. Distribution generalisation: sentiment accuracy (LoRA, host X; mean ± std over {n} seeds)",
        ["module", "domain 1 test", "domain 2 test", "union test"],
        [[arm, pm(s["domain 1"]), pm(s["domain 2"]), pm(s["union"])] for arm, s in d["arms"].items()],
    ) + f"\n\n`check(..., deviation=True).deviation.overall` of the `module` composition (relative Frobenius " \
        f"error of its dW against the exact sum): {pm(d['deviation'], 4)}; how far training moved the shared A " \
        f"(|A - A_init| / |A_init|, mean of m1 and m2): {pm(d['a_drift'], 3)}"
    m = exp["multitask"]
    rows = []
    for kind in ("lora", "ia3"):
        for arm, s in m[kind].items():
            avg = {"mean": (s["sentiment"]["mean"] + s["topic"]["mean"]) / 2,
                   "std": _avg_std(s["sentiment"], s["topic"])}
            rows.append([_kind(kind), arm, pm(s["sentiment"]), pm(s["topic"]), pm(avg)])
    out["multitask"] = table(f"2. Multi-tasking: accuracy per task (host X; mean ± std over {n} seeds)",
                             ["PEFT", "module", "sentiment", "topic", "average"], rows) + \
        f"\n\n`check(..., deviation=True).deviation.overall` of the LoRA `module` merge: {pm(m['lora deviation'], 4)}" \
        f"; LoRA A drift (|A - A_init| / |A_init|, mean of the two modules): {pm(m['lora a_drift'], 3)}"
    u = exp["unlearning"]
    rows = []
    for kind in ("lora", "ia3"):
        for arm, s in u[kind].items():
            rows.append([_kind(kind), arm, f"{s['effect scale']['mean']:+.2f}", pm(s["marked rate"], 2, 100),
                         pm(s["clean perplexity"], 2)])
    out["unlearning"] = table(
        f"3. Unlearning by negation (host X; mean ± std over {n} seeds)",
        ["PEFT", "model", "effect scale", "marked rate (%)", "clean perplexity"], rows,
    ) + "\n\neffect scale: the share of the fine-tuned module's effect (LoRA dW, (IA)^3 l - 1) the " \
        "applied module carries, measured on the exported tensors."
    p = exp["porting"]
    budgets = p["budgets"]
    rows = []
    for kind in ("lora", "ia3"):
        source = pm(p[kind]["source on host X"])
        rows.append([_kind(kind), "(source module on host X)", source] + [""] * (len(budgets) - 1))
        for arm, s in p[kind]["arms"].items():
            rows.append([_kind(kind), arm] + [pm(s[str(b)]) for b in budgets])
    out["porting"] = table(
        f"4. Porting X -> Y: sentiment accuracy on host Y after k fine-tuning steps (mean ± std over {n} seeds)",
        ["PEFT", "module on Y", *[f"k={b}" for b in budgets]], rows,
    )
    return out


def _kind(kind: str) -> str:
    return "LoRA" if kind == "lora" else "(IA)^3"


def _avg_std(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Std over seeds of the per-seed average of two metrics."""
    import statistics

    values = [(x + y) / 2 for x, y in zip(a["values"], b["values"])]
    return statistics.stdev(values) if len(values) > 1 else 0.0


# --- verdicts ---------------------------------------------------------------------------------

REPRODUCED, PARTLY, NOT_REPRODUCED = "REPRODUCED", "PARTLY", "NOT REPRODUCED"


def findings(results: dict[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    """Each finding against a criterion fixed before the runs (stated in describe()):
    experiment -> [(arm label, status, evidence)]."""
    exp = results["experiments"]
    out: dict[str, list[tuple[str, str, str]]] = {}
    d = exp["distribution"]["arms"]
    merged = d["0.5*m1+0.5*m2 module"]["union"]["mean"]
    best_single = max(d["m1 (domain 1)"]["union"]["mean"], d["m2 (domain 2)"]["union"]["mean"])
    out["distribution"] = [(
        "LoRA module", REPRODUCED if merged > best_single else NOT_REPRODUCED,
        f"on the union test set the `module` merge scores {merged:.3f} against {best_single:.3f} for the better "
        f"single module; `exact` merge {d['0.5*m1+0.5*m2 exact']['union']['mean']:.3f}, union-trained reference "
        f"{d['union-trained (reference)']['union']['mean']:.3f}",
    )]
    out["multitask"] = []
    for kind in ("lora", "ia3"):
        m = exp["multitask"][kind]
        avg = lambda arm: (m[arm]["sentiment"]["mean"] + m[arm]["topic"]["mean"]) / 2
        merge = avg("0.5*sent+0.5*topic module")
        singles = max(avg("sentiment module"), avg("topic module"))
        drop = [m["sentiment module"]["sentiment"]["mean"] - m["0.5*sent+0.5*topic module"]["sentiment"]["mean"],
                m["topic module"]["topic"]["mean"] - m["0.5*sent+0.5*topic module"]["topic"]["mean"]]
        extra = f", `exact` merge {avg('0.5*sent+0.5*topic exact'):.3f}" if kind == "lora" else ""
        out["multitask"].append((
            f"{_kind(kind)} module", REPRODUCED if merge > singles else NOT_REPRODUCED,
            f"the merge averages {merge:.3f} over the two tasks against {singles:.3f} for the better single module"
            f"{extra}; against each task's own module it loses {drop[0]:.3f} on sentiment and {drop[1]:.3f} on topic",
        ))
    out["unlearning"] = []
    for kind in ("lora", "ia3"):
        u = exp["unlearning"][kind]
        host = u["host"]
        for meth in (("exact", "module") if kind == "lora" else ("module",)):
            good = [arm for arm in u if arm.endswith(f"*m {meth}")
                    and u[arm]["marked rate"]["mean"] < host["marked rate"]["mean"]
                    and u[arm]["clean perplexity"]["mean"] <= 1.10 * host["clean perplexity"]["mean"]]
            if good:
                best = min(good, key=lambda a: u[a]["marked rate"]["mean"])
                out["unlearning"].append((
                    f"{_kind(kind)} {meth}", REPRODUCED,
                    f"{best}: marked rate {100 * u[best]['marked rate']['mean']:.2f}% vs host "
                    f"{100 * host['marked rate']['mean']:.2f}%, clean perplexity "
                    f"{u[best]['clean perplexity']['mean']:.2f} vs {host['clean perplexity']['mean']:.2f}",
                ))
            else:
                out["unlearning"].append((
                    f"{_kind(kind)} {meth}", NOT_REPRODUCED,
                    f"no lambda lowers the marked rate below the host's {100 * host['marked rate']['mean']:.2f}% "
                    "with clean perplexity within 10% of the host's",
                ))
    out["porting"] = []
    p = exp["porting"]
    for kind in ("lora", "ia3"):
        arms = p[kind]["arms"]
        wins = [b for b in p["budgets"] if arms["ported"][str(b)]["mean"] > max(
            arms["default init"][str(b)]["mean"], arms["sampled init"][str(b)]["mean"])]
        status = REPRODUCED if len(wins) == len(p["budgets"]) else (PARTLY if wins else NOT_REPRODUCED)
        out["porting"].append((
            _kind(kind), status,
            f"the ported module is ahead of both alternatives at {len(wins)} of {len(p['budgets'])} budgets "
            f"(k = {', '.join(map(str, wins)) or 'none'})",
        ))
    return out


def verdicts(results: dict[str, Any]) -> dict[str, str]:
    prefix = "(smoke run: a handful of steps, the verdict means nothing) " if results["meta"]["smoke"] else ""
    return {name: prefix + "; ".join(f"{label}: {status} ({evidence})" for label, status, evidence in items) + "."
            for name, items in findings(results).items()}


def status(results: dict[str, Any], name: str) -> str:
    """A short mark for a figure title: 'reproduced', or per arm when they differ."""
    items = findings(results)[name]
    if len({s for _, s, _ in items}) == 1:
        return items[0][1].lower()
    return ", ".join(f"{label}: {s.lower()}" for label, s, _ in items)


# --- the figure -------------------------------------------------------------------------------


def figure(results: dict[str, Any], path: Path) -> Path | None:
    """One PNG with a panel per finding; None (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    exp = results["experiments"]
    n = results["meta"]["seeds"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]

    # 1. distribution generalisation
    ax = axes[0, 0]
    d = exp["distribution"]["arms"]
    arms = list(d)
    labels = ["m1\n(dom. 1)", "m2\n(dom. 2)", "merge\nmodule", "merge\nexact", "union-\ntrained"]
    for j, split in enumerate(("domain 1", "domain 2", "union")):
        xs = [i + (j - 1) * 0.27 for i in range(len(arms))]
        ax.bar(xs, [d[a][split]["mean"] for a in arms], 0.27, yerr=[d[a][split]["std"] for a in arms],
               label=f"{split} test", color=colors[j], capsize=2)
    ax.set_xticks(range(len(arms)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("accuracy")
    ax.set_title(f"1. Distribution generalisation (LoRA): 0.5*m1 + 0.5*m2\n[{status(results, 'distribution')}]",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right")

    # 2. multi-tasking
    ax = axes[0, 1]
    m = exp["multitask"]
    groups = [("lora", "sentiment module", "LoRA\nsent."), ("lora", "topic module", "LoRA\ntopic"),
              ("lora", "0.5*sent+0.5*topic module", "LoRA\nmerge"),
              ("lora", "0.5*sent+0.5*topic exact", "LoRA\nmerge ex."),
              ("ia3", "sentiment module", "IA3\nsent."), ("ia3", "topic module", "IA3\ntopic"),
              ("ia3", "0.5*sent+0.5*topic module", "IA3\nmerge")]
    for j, task in enumerate(("sentiment", "topic")):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(groups))]
        ax.bar(xs, [m[k][a][task]["mean"] for k, a, _ in groups], 0.38,
               yerr=[m[k][a][task]["std"] for k, a, _ in groups], label=f"{task} task", color=colors[j + 2], capsize=2)
    ax.set_xticks(range(len(groups)), [g[2] for g in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title(f"2. Multi-tasking: 0.5*a + 0.5*b\n[{status(results, 'multitask')}]", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")

    # 3. unlearning: rate and perplexity against the coefficient c of host + c*m
    u = exp["unlearning"]
    lambdas = exp["unlearning"]["lambdas"]
    series = [("lora", "exact", "LoRA exact"), ("lora", "module", "LoRA module (dW scales by lam^2)"),
              ("ia3", "module", "(IA)^3 module")]
    for ax, metric, scale, ylabel in ((axes[0, 2], "marked rate", 100, "marked tokens (% of next-token mass)"),
                                      (axes[1, 0], "clean perplexity", 1, "clean-text perplexity")):
        for (kind, meth, label), color in zip(series, colors):
            arms = ["host + m (fine-tuned)", "host"] + [f"host - {lam:g}*m {meth}" for lam in lambdas]
            xs = [1.0, 0.0] + [-lam for lam in lambdas]
            ys = [u[kind][a][metric]["mean"] * scale for a in arms]
            es = [u[kind][a][metric]["std"] * scale for a in arms]
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, label=label, color=color)
        ax.axhline(u["lora"]["host"][metric]["mean"] * scale, color="grey", lw=0.8, ls=":", label="host")
        ax.set_xlabel("coefficient c in  host + c*m  (c < 0: negated module)")
        ax.set_ylabel(ylabel)
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    from matplotlib.ticker import FuncFormatter

    for ax in (axes[0, 2], axes[1, 0]):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    verdict = status(results, "unlearning")
    axes[0, 2].set_title(f"3. Unlearning: host + c*m, marked-token rate\n[{verdict}]", fontsize=10)
    axes[1, 0].set_title("3. Unlearning: fluency (clean-text perplexity, log scale)", fontsize=10)

    # 4. porting
    p = exp["porting"]
    budgets = p["budgets"]
    for ax, kind in ((axes[1, 1], "lora"), (axes[1, 2], "ia3")):
        for (arm, s), color in zip(p[kind]["arms"].items(), colors):
            mean = [s[str(b)]["mean"] for b in budgets]
            std = [s[str(b)]["std"] for b in budgets]
            ax.plot(budgets, mean, marker="o", ms=4, label=arm, color=color)
            ax.fill_between(budgets, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            alpha=0.2, color=color)
        ax.axhline(p[kind]["source on host X"]["mean"], color="black", lw=0.8, ls="--", label="source module on X")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("fine-tuning steps on host Y")
        ax.set_ylabel("accuracy on host Y")
        mark = dict((label, st) for label, st, _ in findings(results)["porting"])[_kind(kind)].lower()
        ax.set_title(f"4. Porting X -> Y ({_kind(kind)})\n[{mark}]", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")

    fig.suptitle(f"PEFT module arithmetic and porting, in miniature (tiny Llama hosts, synthetic tasks; "
                 f"mean ± std over {n} seed{'s' if n != 1 else ''})"
                 + ("  [SMOKE RUN: meaningless numbers]" if results["meta"]["smoke"] else ""), fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
