"""Composition benchmark: the registry's compose against a naive script and the PEFT route.

    python bench/compose.py [--quick] [--cases module:2,exact:8] [--repeat 3] [--threads N]
                            [--no-peft] [--profile] [--workdir DIR] [--keep] [--budget SECONDS]
                            [--baseline-tree DIR]

Inputs: LoRA adapters with the shapes of a 7B-class Llama decoder (32 layers; q, k, v, o,
gate, up, down projections; hidden 4096, intermediate 11008), rank 16, lora_alpha 32,
bfloat16, random but fixed by --seed (about 80 MB each). They are written to disk as PEFT
adapter folders, registered once in a fresh registry (SQLite, temporary folder) and read once
so the page cache is warm; none of that is timed. Each case (method ``module`` or ``exact``,
n inputs) is then measured three ways, every measurement in a fresh process
(bench/_compose_worker.py):

- registry: ``Registry.compose`` through the Python API, registration of the output
  included, a new output name (and a fresh copy of the catalog) each run;
- naive: ``safetensors.torch.load_file`` every input, the same arithmetic in float32 with
  torch, cast to bf16, ``save_file``;
- PEFT (``exact`` only, which is PEFT's ``combination_type="cat"``): a base model,
  ``PeftModel.from_pretrained`` / ``load_adapter`` for each input,
  ``add_weighted_adapter(combination_type="cat")``, ``save_pretrained``. The base is a
  full-size Llama-7B-shaped ``LlamaForCausalLM`` (32 layers, so the real adapters attach
  unchanged), built on the meta device, allocated with ``to_empty`` and zero-filled: the
  memory a loaded base occupies, without reading a 13.5 GB checkpoint (which a user would
  also do). Each phase is timed, so the table shows PEFT without the base, with the base
  only allocated (a floor), and with it materialised.

- pem: the whole ``pem compose`` process (``python -m cli.main compose ...``, the command a
  user runs), timed and its peak resident set taken by the parent (``wait4``): interpreter
  start-up, imports, planning, reading and hashing every input (each is checked against its
  digest), computing, writing, fsync and registration. With ``--baseline-tree DIR`` the same
  command is also run from another checkout (e.g. the commit before a change) in the same
  passes, so that the two are compared pair by pair on the same machine state.

Step times are measured inside the worker and exclude interpreter start-up and imports;
"proc" is the whole process as the parent sees it. Memory is the resident set: the baseline
right before the step, and the step's peak (the kernel's high-water mark is reset before the
step, so the peak is the step's own, baseline included). Times are medians over --repeat
runs (one pass over every case, then PEFT, then the other passes while they fit in --budget
seconds), peaks the maximum. On a shared 2-core machine torch's two intra-op threads are
often descheduled mid-operation, which inflates every torch route several-fold: --threads 1
shows the single-thread numbers.

Targets (from the issues): the whole ``pem compose`` process at most as slow as the naive
script's (ratio <= 1.0) at 4 and 8 inputs, and at most a third of its peak memory at 8
inputs; at least 10x faster than the PEFT route including the base model's construction;
sha256 at 1 GB/s or more (hashlib, 256 MB buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = Path(__file__).resolve().with_name("_compose_worker.py")
ROOT = Path(__file__).resolve().parents[1]
METHODS = ("module", "exact")
DEFAULT_CASES = [(m, n) for m in METHODS for n in (2, 4, 8)]
MB = 1024 * 1024

# Targets from the issues.
MAX_TIME_RATIO = 1.0  # pem compose / naive, whole processes, 4 and 8 inputs
MAX_MEMORY_RATIO = 1 / 3  # pem compose / naive peak memory, whole processes, 8 inputs
MIN_PEFT_SPEEDUP = 10.0  # PEFT (base construction included) / registry
MIN_DIGEST_RATE = 1e9  # bytes per second


def parse_cases(tokens: list[str]) -> list[tuple[str, int]]:
    cases = []
    for token in ",".join(tokens).split(","):
        if not token.strip():
            continue
        method, sep, count = token.strip().partition(":")
        if method not in METHODS or not sep or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--cases: {token!r} is not METHOD:N with METHOD in {', '.join(METHODS)}")
        cases.append((method, int(count)))
    return cases


def coefficients(n: int) -> list[str]:
    """The weights of an n-input case, as decimal literals: 1/n each, the last one negative
    from 4 inputs on (so negation is exercised)."""
    text = f"{1 / n:.6f}".rstrip("0")
    return [("-" if n >= 4 and i == n - 1 else "") + text for i in range(n)]


def expression(n: int) -> str:
    parts = []
    for i, weight in enumerate(coefficients(n)):
        term = f"{weight.lstrip('-')}*bench/lora-{i:02d}"
        parts.append(term if i == 0 else (" - " if weight.startswith("-") else " + ") + term)
    return "".join(parts)


# --- running workers ----------------------------------------------------------------------------


THREADS: int | None = None  # --threads: OMP_NUM_THREADS for every worker (torch's intra-op threads)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS is not None:
        env["OMP_NUM_THREADS"] = str(THREADS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"  # no network look-ups for the made-up base model id
    env["TRANSFORMERS_VERBOSITY"] = "error"
    for name in ("PEM_HOME", "PEM_DATABASE_URL", "PEM_STORE"):  # the bench passes its own
        env.pop(name, None)
    return env


def run_worker(spec: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True, env=worker_env()
    )
    process_s = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {spec['kind']} failed (exit {proc.returncode})")
    result = json.loads(lines[-1])
    result["process_s"] = process_s
    return result


def warm(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MB):
                pass


def copy_database(source: str, target: Path) -> None:
    """A fresh catalog holding only the registered inputs: every run computes (no earlier
    derivation with the same identity to reuse) and gets a new output name."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, setup: dict):
        self.args = args
        self.workdir = workdir
        self.setup = setup
        self.runs = workdir / "runs"
        self.runs.mkdir(exist_ok=True)
        self.counter = 0

    def _next(self, label: str) -> Path:
        self.counter += 1
        return self.runs / f"{self.counter:03d}-{label}"

    def inputs(self, n: int) -> dict:
        weights = [float(w) for w in coefficients(n)]
        return {
            "folders": self.setup["adapters"][:n],
            "blobs": self.setup["blobs"][:n],
            "a": [abs(w) for w in weights],
            "b": weights,
            "bytes": sum(self.setup["blob_bytes"][:n]),
        }

    def registry(self, method: str, n: int, profile: str | None = None) -> dict:
        inputs = self.inputs(n)
        database = self._next(f"registry-{method}-{n}.db")
        copy_database(self.setup["database"], database)
        warm(inputs["blobs"])
        spec = {
            "kind": "registry", "home": self.setup["home"], "database": str(database), "store": self.setup["store"],
            "expression": expression(n), "name": f"bench/out-{method}-{n}-run{self.counter}", "method": method,
            "profile": profile,
        }
        try:
            result = run_worker(spec)
        finally:
            remove_database(database)
        digest = result["digest"]
        Path(self.setup["store"], "sha256", digest[:2], digest[2:]).unlink(missing_ok=True)  # the next run writes it again
        return result

    def pem(self, method: str, n: int, tree: Path = ROOT) -> dict:
        """One whole `pem compose` process run from ``tree``, on a fresh copy of the catalog."""
        inputs = self.inputs(n)
        database = self._next(f"pem-{method}-{n}.db")
        copy_database(self.setup["database"], database)
        warm(inputs["blobs"])
        env = worker_env()
        env.update(PEM_HOME=self.setup["home"], PEM_DATABASE_URL=f"sqlite:///{database}", PEM_STORE=self.setup["store"],
                   PYTHONPATH=str(tree))
        command = [sys.executable, "-m", "cli.main", "compose", expression(n), "--name", f"bench/out-{method}-{n}",
                   "--method", method, "--json"]
        try:
            start = time.perf_counter()
            proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            process_s = time.perf_counter() - start
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                sys.stderr.write(out.decode()[-4000:] + err.decode()[-4000:])
                raise SystemExit(f"pem compose from {tree} failed (exit {proc.returncode})")
        finally:
            remove_database(database)
        digest = json.loads(out)["digest"]
        Path(self.setup["store"], "sha256", digest[:2], digest[2:]).unlink(missing_ok=True)  # the next run writes it again
        return {"process_s": process_s, "process_peak_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
                "digest": digest}

    def naive(self, method: str, n: int) -> dict:
        inputs = self.inputs(n)
        output = self._next(f"naive-{method}-{n}")
        warm([str(Path(f) / "adapter_model.safetensors") for f in inputs["folders"]])
        spec = {"kind": "naive", "inputs": inputs["folders"], "a": inputs["a"], "b": inputs["b"],
                "method": method, "output": str(output)}
        try:
            return run_worker(spec)
        finally:
            shutil.rmtree(output, ignore_errors=True)

    def peft(self, n: int) -> dict:
        inputs = self.inputs(n)
        output = self._next(f"peft-exact-{n}")
        warm([str(Path(f) / "adapter_model.safetensors") for f in inputs["folders"]])
        spec = {"kind": "peft", "inputs": inputs["folders"], "b": inputs["b"], "layers": self.args.layers,
                "output": str(output)}
        try:
            return run_worker(spec)
        finally:
            shutil.rmtree(output, ignore_errors=True)


# --- reporting ------------------------------------------------------------------------------------


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def peak(runs: list[dict], key: str = "step_peak_mb") -> float:
    return max(r[key] for r in runs)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def paired_ratio(runs: list[dict], others: list[dict], key: str) -> float:
    """The median of run-by-run ratios: runs of the same pass ran next to each other, so a
    ratio holds when the machine's speed drifts between passes."""
    return statistics.median(a[key] / b[key] for a, b in zip(runs, others))


def print_pem_table(cases, results, with_baseline: bool) -> None:
    """The README's table: whole processes, `pem compose` against the naive script."""
    print("\nwhole processes: `pem compose` (inputs hashed against their digests, output hashed, fsynced and "
          "registered) against the naive script\n(ratios: median of run-by-run ratios; peaks: max over runs)\n")
    head = "| case | pem compose | naive script | pem / naive | peak MB pem / naive | peak ratio | registry step (API) |"
    rule = "|---|---|---|---|---|---|---|"
    if with_baseline:
        head += " baseline tree | pem / baseline |"
        rule += "---|---|"
    print(head)
    print(rule)
    for method, n in cases:
        pem, naive, api = (results[(method, n)][k] for k in ("pem", "naive", "registry"))
        row = (f"| {method} x{n} | {median(pem, 'process_s'):.2f} s | {median(naive, 'process_s'):.2f} s | "
               f"{paired_ratio(pem, naive, 'process_s'):.2f}x | {peak(pem, 'process_peak_mb'):.0f} / "
               f"{peak(naive, 'process_peak_mb'):.0f} | {peak(pem, 'process_peak_mb') / peak(naive, 'process_peak_mb'):.2f}x"
               f" | {median(api, 'step_s'):.2f} s |")
        if with_baseline:
            base = results[(method, n)]["baseline"]
            row += f" {median(base, 'process_s'):.2f} s | {paired_ratio(pem, base, 'process_s'):.2f}x |"
        print(row)


def report(args, setup, cases, results, digest, elapsed) -> None:
    size = statistics.mean(setup["blob_bytes"]) / MB
    print()
    print(f"inputs: {len(setup['adapters'])} LoRA adapters shaped like a 7B Llama decoder: {args.layers} layers x "
          f"(q, k, v, o, gate, up, down), hidden 4096, intermediate 11008, rank 16, alpha 32, bf16, seed {args.seed}; "
          f"{size:.1f} MB each")
    print(f"setup (not timed): generated in {setup['generated_s']:.1f} s, registered (Registry.add x{len(setup['refs'])}, "
          f"SQLite) in {setup['registered_s']:.1f} s{' (reused from --workdir)' if setup.get('reused') else ''}; "
          "page cache warmed before every run")
    print("each number comes from a fresh process. step = the work after imports, timed inside the process:")
    print("  registry: Registry.compose(expression, new name, method) incl. planning, reading and hashing the inputs,")
    print("            the output blob (hashed, fsynced) and its registration; the catalog is opened and the engine")
    print("            imported before the step")
    print("  naive:    load_file each input, float32 arithmetic, cast to bf16, save_file (no fsync, no hash)")
    print(f"  PEFT:     LlamaForCausalLM(hidden 4096, intermediate 11008, {args.layers} layers, 32 heads, vocab 32000), "
          "bf16, built on the meta device,")
    print("            to_empty, then zero-filled (the memory of a loaded base, without reading a 13.5 GB checkpoint,")
    print("            which a user would also do); PeftModel.from_pretrained + load_adapter per input,")
    print("            add_weighted_adapter(combination_type='cat'), save_pretrained(selected_adapters=['merged'])")
    print("proc = whole process as the parent sees it (interpreter start-up and imports included)")
    threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else f"torch's default ({os.cpu_count()} on this machine)"
    print(f"times: median of {args.repeat} run(s) (PEFT: {args.peft_repeat}); peaks: max over runs; "
          f"torch intra-op threads: {threads}")

    print_pem_table(cases, results, bool(args.baseline_tree))

    print("\nwall time, seconds")
    print(f"{'case':11}  {'registry':>15}  {'naive':>15}  {'PEFT exact (cat)':>35}  {'registry/naive':>15}"
          f"  {'PEFT/registry (step)':>26}")
    print(f"{'':11}  {'step':>7} {'proc':>7}  {'step':>7} {'proc':>7}  {'no base':>8} {'+alloc':>8} {'+filled':>8} "
          f"{'proc':>8}  {'step':>7} {'proc':>7}  {'no base':>8} {'+alloc':>8} {'+filled':>8}")
    for method, n in cases:
        r, v, p = results[(method, n)]["registry"], results[(method, n)]["naive"], results[(method, n)].get("peft")
        rs, rp, vs, vp = median(r, "step_s"), median(r, "process_s"), median(v, "step_s"), median(v, "process_s")
        if p:
            pn, pa, pf, pp = (median(p, k) for k in ("without_base_s", "allocated_base_s", "step_s", "process_s"))
            peft_cells = f"{pn:>8.2f} {pa:>8.2f} {pf:>8.2f} {pp:>8.2f}"
            speed_cells = f"{pn / rs:>7.1f}x {pa / rs:>7.1f}x {pf / rs:>7.1f}x"
        else:
            peft_cells = " ".join(f"{'-':>8}" for _ in range(4))
            speed_cells = " ".join(f"{'-':>8}" for _ in range(3))
        print(f"{method + ' x' + str(n):11}  {rs:>7.2f} {rp:>7.2f}  {vs:>7.2f} {vp:>7.2f}  {peft_cells}"
              f"  {rs / vs:>6.2f}x {rp / vp:>6.2f}x  {speed_cells}")
    print("(PEFT: no base = from_pretrained/load_adapter + add_weighted_adapter + save_pretrained; +alloc adds building "
          "the base\n on the meta device and to_empty; +filled also zero-fills its weights = the whole step)")

    print("\nmemory, MB resident (base = right before the step, after imports; peak = highest during the step, "
          "base included; +step = peak - base)")
    print(f"{'case':11}  {'registry':>19}  {'naive':>19}  {'PEFT':>13}  {'peak registry/naive':>19}  {'input read, MB/s':>17}")
    print(f"{'':11}  {'base':>5} {'peak':>6} {'+step':>6}  {'base':>5} {'peak':>6} {'+step':>6}  {'base':>5} "
          f"{'peak':>7}  {'abs':>9} {'+step':>9}  {'registry':>8} {'naive':>8}")
    for method, n in cases:
        r, v, p = results[(method, n)]["registry"], results[(method, n)]["naive"], results[(method, n)].get("peft")
        rb, rk, vb, vk = median(r, "baseline_mb"), peak(r), median(v, "baseline_mb"), peak(v)
        read = results[(method, n)]["input_bytes"] / MB
        peft_cells = f"{median(p, 'baseline_mb'):>5.0f} {peak(p):>7.0f}" if p else f"{'-':>5} {'-':>7}"
        print(f"{method + ' x' + str(n):11}  {rb:>5.0f} {rk:>6.0f} {rk - rb:>6.0f}  {vb:>5.0f} {vk:>6.0f} {vk - vb:>6.0f}  "
              f"{peft_cells}  {rk / vk:>8.2f}x {(rk - rb) / max(vk - vb, 1e-9):>8.2f}x  "
              f"{read / median(r, 'step_s'):>8.0f} {read / median(v, 'step_s'):>8.0f}")

    peft_cases = [(m, n) for m, n in cases if results[(m, n)].get("peft")]
    if peft_cases:
        print("\nPEFT step breakdown, seconds (median): build+allocate base / zero-fill base / "
              "from_pretrained+load_adapter / add_weighted_adapter / save_pretrained")
        for method, n in peft_cases:
            p = results[(method, n)]["peft"]
            phases = " / ".join(f"{median(p, k):.2f}" for k in ("base_alloc_s", "base_fill_s", "load_s", "merge_s", "save_s"))
            print(f"  {method} x{n}: {phases}  (base: {p[0]['base_parameters'] / 1e9:.2f} B parameters, "
                  f"RSS once filled {p[0]['base_rss_mb']:.0f} MB)")

    print("\nstep detail (median unless said): fastest step s / CPU s (user+sys) / sys s / minor page faults"
          " [/ catalog open s]")
    for method, n in cases:
        r = results[(method, n)]["registry"]
        v = results[(method, n)]["naive"]
        print(f"  {method} x{n}: registry {min(x['step_s'] for x in r):.2f} / {median(r, 'step_cpu_s'):.2f} / "
              f"{median(r, 'step_sys_s'):.2f} / {median(r, 'step_minor_faults'):,.0f} / {median(r, 'open_s'):.3f};"
              f"  naive {min(x['step_s'] for x in v):.2f} / {median(v, 'step_cpu_s'):.2f} / "
              f"{median(v, 'step_sys_s'):.2f} / {median(v, 'step_minor_faults'):,.0f}")

    print("\ntargets:")
    for method, n in cases:
        if n < 4:
            continue
        pem, naive = results[(method, n)]["pem"], results[(method, n)]["naive"]
        ratio = paired_ratio(pem, naive, "process_s")
        print(f"  {method} x{n}: whole `pem compose` process / naive script <= {MAX_TIME_RATIO:.1f}: {ratio:.2f} "
              f"{verdict(ratio <= MAX_TIME_RATIO)} (median of {len(pem)} paired run(s))")
        if n == 8:
            memory = peak(pem, "process_peak_mb") / peak(naive, "process_peak_mb")
            print(f"  {method} x{n}: peak memory pem / naive <= 1/3: {peak(pem, 'process_peak_mb'):.0f} / "
                  f"{peak(naive, 'process_peak_mb'):.0f} MB = {memory:.2f} {verdict(memory <= MAX_MEMORY_RATIO)}")
    for method, n in peft_cases:
        r, p = results[(method, n)]["registry"], results[(method, n)]["peft"]
        rs, rp = median(r, "step_s"), median(r, "process_s")
        filled, alloc, proc = median(p, "step_s") / rs, median(p, "allocated_base_s") / rs, median(p, "process_s") / rp
        print(f"  {method} x{n}: registry >= {MIN_PEFT_SPEEDUP:.0f}x faster than PEFT incl. base construction: "
              f"filled base {filled:.1f}x {verdict(filled >= MIN_PEFT_SPEEDUP)}; allocated-only base (floor) "
              f"{alloc:.1f}x {verdict(alloc >= MIN_PEFT_SPEEDUP)}; whole processes {proc:.1f}x "
              f"{verdict(proc >= MIN_PEFT_SPEEDUP)}")
    rate = digest["sha256_bytes_per_s"]
    print(f"  digest: hashlib sha256 over a {digest['megabytes']} MB buffer: {rate / 1e9:.2f} GB/s "
          f"(>= {MIN_DIGEST_RATE / 1e9:.0f} GB/s) {verdict(rate >= MIN_DIGEST_RATE)}")
    print(f"\nload average at start / end: {args.load_start} / {load_average()} (2 cores; other work on the machine "
          f"shows up as noise); total {elapsed:.0f} s")


def print_profile(path: str, label: str, limit: int) -> None:
    import io
    import pstats

    for order in ("tottime", "cumulative"):
        stream = io.StringIO()
        stats = pstats.Stats(path, stream=stream)
        stats.strip_dirs().sort_stats(order).print_stats(limit)
        text = stream.getvalue()
        start = text.find("   ncalls")
        print(f"\ncProfile of the registry's compose, {label}, by {order}:")
        print(text[start:].rstrip())


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=None,
                        help="METHOD:N[,METHOD:N...] (default: module and exact with 2, 4, 8 inputs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 layers, one run per measurement")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the adapters (default 32)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per registry/naive measurement (default 3)")
    parser.add_argument("--peft-repeat", type=int, default=1, help="runs per PEFT measurement (default 1)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where to generate adapters and the registry (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (a kept --workdir is reused)")
    parser.add_argument("--profile", action="store_true",
                        help="after the measurements, run the registry's compose for the largest case of each "
                             "method once more under cProfile and print the top functions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in every worker (OMP_NUM_THREADS; default: torch's own, "
                             "one per core)")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds: repeats after the first are skipped when they would not fit (default 540)")
    parser.add_argument("--baseline-tree", help="another checkout of the repository: its `pem compose` is run in the "
                                                "same passes and compared pair by pair with this tree's")
    parser.add_argument("--digest-mb", type=int, default=256)
    parser.add_argument("--merges", action="store_true",
                        help="then benchmark svd, ties and dare_ties (full and core space) against exact and PEFT "
                             "(bench/merge.py)")
    parser.add_argument("--bucket", action="store_true",
                        help="then compare the S3 bucket store (cold and warm cache) with the local store (bench/store.py)")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    args.layers = args.layers or (4 if args.quick else 32)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.load_start = load_average()
    cases = parse_cases(args.cases) if args.cases else DEFAULT_CASES
    started = time.perf_counter()

    if args.workdir:
        workdir = Path(args.workdir).absolute()
        created = not workdir.exists()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pem-bench-compose-"))
        created = True
    try:
        count = max(n for _, n in cases)
        print(f"generating and registering {count} adapters ({args.layers} layers) in {workdir} ...", flush=True)
        setup = run_worker({"kind": "setup", "workdir": str(workdir), "layers": args.layers, "seed": args.seed,
                            "count": count})
        bench = Bench(args, workdir, setup)
        baseline = Path(args.baseline_tree).resolve() if args.baseline_tree else None
        results: dict = {case: {"registry": [], "naive": [], "pem": [], "baseline": [],
                                "input_bytes": bench.inputs(case[1])["bytes"]} for case in cases}

        def one_pass(rep: int) -> float:
            start = time.perf_counter()
            for method, n in cases:
                routes = ["pem", "naive", "registry"] + (["baseline"] if baseline else [])
                print(f"run {rep + 1}/{args.repeat}: {method} x{n}: {', '.join(routes)}", flush=True)
                # alternate the order, so that no route always follows another's page-cache traffic
                for route in routes if rep % 2 == 0 else routes[::-1]:
                    run = {"pem": lambda: bench.pem(method, n), "naive": lambda: bench.naive(method, n),
                           "registry": lambda: bench.registry(method, n),
                           "baseline": lambda: bench.pem(method, n, tree=baseline)}[route]
                    results[(method, n)][route].append(run())
            return time.perf_counter() - start

        pass_s = one_pass(0)
        if not args.no_peft:
            for method, n in cases:
                if method != "exact":
                    continue
                results[(method, n)]["peft"] = []
                for rep in range(args.peft_repeat):
                    print(f"PEFT: exact x{n} (run {rep + 1}/{args.peft_repeat})", flush=True)
                    results[(method, n)]["peft"].append(bench.peft(n))
        print(f"sha256 throughput ({args.digest_mb} MB) ...", flush=True)
        digest = run_worker({"kind": "digest", "megabytes": args.digest_mb})
        for rep in range(1, args.repeat):
            left = args.budget - (time.perf_counter() - started)
            if left < 1.5 * pass_s:  # stay inside the time budget on a busy machine
                print(f"--budget: {left:.0f} s left, a pass takes ~{pass_s:.0f} s: stopping at {rep} run(s)")
                args.repeat = rep
                break
            pass_s = one_pass(rep)
        report(args, setup, cases, results, digest, time.perf_counter() - started)
        if args.profile:
            for method in METHODS:
                largest = max((n for m, n in cases if m == method), default=None)
                if largest is None:
                    continue
                path = str(workdir / f"profile-{method}-{largest}.prof")
                result = bench.registry(method, largest, profile=path)
                print_profile(path, f"{method} x{largest} (step {result['step_s']:.2f} s under the profiler)", 25)
        if args.merges:
            print("\nmerge methods (bench/merge.py):", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).with_name("merge.py"))], check=True)
        if args.bucket:
            print("\nbucket store against local store (bench/store.py), same adapters:", flush=True)
            store_args = ["--workdir", str(workdir), "--inputs", "4"] + (["--quick"] if args.quick else [])
            subprocess.run([sys.executable, str(Path(__file__).with_name("store.py")), *store_args], check=True)
    finally:
        if args.keep:
            print(f"\nkept: {workdir}")
        else:
            for name in ("adapters", "registry", "runs", "setup.json"):
                target = workdir / name
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
            for prof in workdir.glob("profile-*.prof"):
                prof.unlink()
            if created:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
