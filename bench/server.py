"""The registry server under load: requests per second and latency, against the local API.

    python bench/server.py [--quick] [--seconds 10] [--clients 1,8,32] [--replicas 1,2]

Starts `pem serve` (1 and 2 replicas) on PostgreSQL (the machine's, a new database dropped at
the end) and a bucket (moto's S3 server on loopback, as in bench/store.py), then runs 1, 8 and
32 concurrent clients (threads, each its own RemoteRegistry) for a bounded time, each doing a
realistic mix: list 30%, show 25%, lineage 20%, add 15% (a new small LoRA each time), compose
10% (a new expression over two small modules each time). It prints requests per second, p50
and p99 latency per operation, and the same operations through the local API (same database
and bucket, in this process, one caller) as the baseline, with the ratio of the p50s. It
counts errors, and checks that every name got gapless, distinct versions.

On a 2-core machine, server replicas, clients, PostgreSQL and the S3 server share the same
two cores: more replicas or clients measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

PG_ADMIN_URL = os.environ.get("PEM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MIX = (("list", 30), ("show", 25), ("lineage", 20), ("add", 15), ("compose", 10))
HIDDEN, RANK = 64, 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_lora(folder: Path, seed: int) -> Path:
    """A small LoRA folder (2 layers, hidden 64, rank 8), unique content per seed."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for proj in ("q_proj", "v_proj"):
        layer = f"base_model.model.model.layers.0.self_attn.{proj}"
        arrays[f"{layer}.lora_A.weight"] = rng.standard_normal((RANK, HIDDEN)).astype(np.float32)
        arrays[f"{layer}.lora_B.weight"] = rng.standard_normal((HIDDEN, RANK)).astype(np.float32)
    save_file(arrays, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "bench-org/tiny", "task_type": "CAUSAL_LM"}))
    return folder


class Workload:
    """The operation mix, for one caller (a RemoteRegistry or the local Registry)."""

    def __init__(self, registry, workdir: Path, caller: str, seeds: "iter"):
        self.registry, self.workdir, self.caller, self.seeds = registry, workdir, caller, seeds
        self.rng = random.Random(caller)
        self.adds = 0

    def run(self, operation: str) -> None:
        r = self.registry
        if operation == "list":
            r.list(limit=50)
        elif operation == "show":
            r.get(self.rng.choice(("bench/a", "bench/b", "bench/ab")))
        elif operation == "lineage":
            r.lineage("bench/ab")
        elif operation == "add":
            seed = next(self.seeds)
            folder = write_lora(self.workdir / "adapters" / str(seed), seed)
            r.add(folder, f"bench/w-{self.caller}")
            self.adds += 1
            shutil.rmtree(folder)
        elif operation == "compose":
            k = next(self.seeds)
            r.compose(f"{0.5 + (k % 997) / 10000:.4f}*bench/a + 0.5*bench/b", f"bench/c-{self.caller}-{k}")


def warm_up(workload: Workload) -> None:
    """Each operation once, unmeasured: imports, connections and caches are not the subject."""
    for operation, _ in MIX:
        workload.run(operation)


def drive(workload: Workload, until: float, latencies: dict[str, list[float]], errors: list[str]) -> None:
    operations = [op for op, weight in MIX for _ in range(weight)]
    while time.monotonic() < until:
        operation = workload.rng.choice(operations)
        started = time.perf_counter()
        try:
            workload.run(operation)
        except Exception as exc:  # counted and shown: the run must have none
            errors.append(f"{operation}: {exc.__class__.__name__}: {exc}")
            continue
        latencies.setdefault(operation, []).append(time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Stack:
    """PostgreSQL database + moto bucket + N `pem serve` replicas."""

    def __init__(self, workdir: Path):
        from sqlalchemy import create_engine, text
        from store import BUCKET, start_bucket

        self.workdir = workdir
        self.bucket_server = start_bucket()  # sets the AWS_* and PEM_S3_ENDPOINT_URL variables here
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.db_name = f"pem_bench_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        self.env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PEM_S3"))}
        self.env |= {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "PEM_HOME": str(workdir / "server-home"),
                     "PEM_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + self.db_name,
                     "PEM_STORE": f"s3://{BUCKET}/server"}
        self.processes: list[subprocess.Popen] = []

    def local(self):
        from registry import Registry

        return Registry.open(self.env["PEM_HOME"], database_url=self.env["PEM_DATABASE_URL"], store=self.env["PEM_STORE"])

    def init(self) -> str:
        from registry import Registry
        from registry.server.tokens import create_token

        with Registry.init(self.env["PEM_HOME"], database_url=self.env["PEM_DATABASE_URL"],
                           store=self.env["PEM_STORE"], user="bench") as registry:
            token = create_token(registry, "bench", "writer").token
            for name, seed in (("bench/a", 1), ("bench/b", 2)):
                registry.add(write_lora(self.workdir / name, seed), name)
            registry.compose("0.5*bench/a + 0.5*bench/b", "bench/ab")
        return token

    def serve(self, replicas: int) -> list[str]:
        self.stop()
        urls = []
        for _ in range(replicas):
            port = free_port()
            log = open(self.workdir / f"server-{port}.log", "ab")
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "cli.main", "serve", "--port", str(port)], cwd=ROOT, env=self.env,
                stdout=log, stderr=log))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{url}/healthz", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
        return urls

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(timeout=60)
        self.processes = []

    def close(self) -> None:
        from sqlalchemy import text

        self.stop()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()
        self.bucket_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 seconds per cell")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each cell")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pem-bench-server-"))
    stack = Stack(workdir)
    seeds = iter(range(10_000, 10_000_000))
    seed_lock = threading.Lock()

    def next_seed() -> "iter":
        while True:
            with seed_lock:
                value = next(seeds)
            yield value

    try:
        token = stack.init()
        from registry.remote import RemoteRegistry

        # the baseline: the local API on the same database and bucket, one caller
        local_latencies: dict[str, list[float]] = {}
        local_errors: list[str] = []
        with stack.local() as local:
            baseline = Workload(local, workdir, "local", next_seed())
            warm_up(baseline)
            drive(baseline, time.monotonic() + seconds, local_latencies, local_errors)
        callers_local = [baseline]
        local_p50 = {op: statistics.median(v) for op, v in local_latencies.items()}
        print(f"local API, 1 caller, {seconds:g} s: " + ", ".join(
            f"{op} p50 {local_p50[op] * 1000:.1f} ms" for op, _ in MIX if op in local_p50) +
            f"; errors {len(local_errors)}")
        print()
        print(f"{'replicas':>8} {'clients':>7} {'req/s':>7}  {'op':<8} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'local p50':>9} {'p50 ratio':>9}")
        all_errors = list(local_errors)
        callers: list[Workload] = list(callers_local)
        for replicas in map(int, args.replicas.split(",")):
            urls = stack.serve(replicas)
            for i, url in enumerate(urls):
                warmer = Workload(RemoteRegistry(url, token=token, home=workdir / "client-home"), workdir,
                                  f"warm-{replicas}-{i}", next_seed())
                warm_up(warmer)
                callers.append(warmer)
            for clients in map(int, args.clients.split(",")):
                latencies: dict[str, list[float]] = {}
                errors: list[str] = []
                workloads = []
                for i in range(clients):
                    url = urls[i % len(urls)]
                    remote = RemoteRegistry(url, token=token, home=workdir / "client-home")
                    workloads.append(Workload(remote, workdir, f"r{replicas}c{clients}n{i}", next_seed()))
                until = time.monotonic() + seconds
                started = time.monotonic()
                threads = [threading.Thread(target=drive, args=(w, until, latencies, errors)) for w in workloads]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.monotonic() - started
                total = sum(len(v) for v in latencies.values())
                first = True
                for op, _ in MIX:
                    values = latencies.get(op, [])
                    if not values:
                        continue
                    p50 = statistics.median(values)
                    lead = f"{replicas:>8} {clients:>7} {total / elapsed:>7.1f}" if first else " " * 24
                    print(f"{lead}  {op:<8} {len(values):>5} {p50 * 1000:>8.1f} {percentile(values, 0.99) * 1000:>8.1f} "
                          f"{local_p50.get(op, float('nan')) * 1000:>9.1f} {p50 / local_p50[op] if op in local_p50 else float('nan'):>9.2f}")
                    first = False
                all_errors += errors
                callers += workloads
        stack.stop()
        # every name written got gapless, distinct versions: nothing lost, nothing duplicated
        problems = []
        with stack.local() as local:
            versions: dict[str, list[tuple[int, str]]] = {}
            for module in local.list():
                versions.setdefault(module.name, []).append((module.version, module.digest))
        for workload in callers:
            got = versions.get(f"bench/w-{workload.caller}", [])
            if [v for v, _ in got] != list(range(1, workload.adds + 1)) or len({d for _, d in got}) != len(got):
                problems.append(f"bench/w-{workload.caller}: {workload.adds} adds, versions {[v for v, _ in got]}")
        print()
        print(f"errors: {len(all_errors)}" + (f" (first: {all_errors[0]})" if all_errors else ""))
        print(f"lost or duplicated versions: {len(problems)}" + (f" (first: {problems[0]})" if problems else ""))
    finally:
        stack.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
