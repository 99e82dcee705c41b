"""Start-up of catalog commands against a bare ``python -c "import torch"``, in the same run.

    python bench/startup.py [--runs 11] [--profile] [--workdir DIR] [--keep]

`pem list`, `pem show` and `pem --help` touch no tensor, so their time is the interpreter's
start and the imports they need, plus a few milliseconds of SQL. Each is run as a whole
process (`python -m cli.main ...`, from this checkout), alternating with the baseline
(A B A B ...) so that a drift in the machine's speed hits both alike. Printed per command:
median wall and CPU (user + sys, from the OS's accounting of the child), and the median
of the per-pair ratios command / baseline. The goal is 0.2 or less. On a shared machine
quote the ratios, not the seconds, and prefer CPU: wall time includes waiting for a core.

``--profile`` adds, per command, the modules that cost most to import (``python -X
importtime``, cumulative, minimum over the runs): what remains of the start-up.

The registry is a temporary one holding one small LoRA module written with json and struct,
so this script itself never imports torch either.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = [sys.executable, "-c", "import torch"]
COMMANDS = {
    "pem list": ["list"],
    "pem list --json": ["list", "--json"],
    "pem show": ["show", "bench/tiny"],
    "pem --help": ["--help"],
}


def write_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "bench-org/tiny", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    }
    raw = json.dumps(header).encode()
    data = struct.pack("<16f", *(0.01 * i for i in range(16)))
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + sys, from wait4) and stderr of one whole process."""
    stderr_file = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, stderr_file.fileno(), 2),
    ])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    stderr_file.seek(0)
    stderr = stderr_file.read()
    stderr_file.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{stderr[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, stderr


def import_profile(stderr: str) -> dict[str, int]:
    """Microseconds spent importing each package (its modules' own time, summed), from
    ``-X importtime`` output."""
    spent: dict[str, int] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line[len("import time:"):].split("|")
        package = name.strip().split(".")[0]
        spent[package] = spent.get(package, 0) + int(own)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=11, help="runs of each command (after one warm-up)")
    parser.add_argument("--profile", action="store_true", help="also print what each command spends importing")
    parser.add_argument("--workdir", type=Path, help="where to put the registry (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the registry")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pem-startup-"))
    home = workdir / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEM_")}
    env.update(PEM_HOME=str(home), PEM_USER="bench")
    try:
        from registry import Registry

        write_adapter(workdir / "adapter")
        with Registry.init(home, user="bench") as registry:
            registry.add(workdir / "adapter", "bench/tiny")
        pem = [sys.executable, "-m", "cli.main"]
        for label, argv in COMMANDS.items():
            run(pem + argv, env)  # warm-up: page cache, .pyc files
        run(BASELINE, env)

        print(f"whole processes, {args.runs} runs each, alternating with the baseline; medians")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        print(f"{'command':<18}{'wall s':>9}{'cpu s':>9}{'wall/base':>11}{'cpu/base':>10}")
        base_walls: list[float] = []
        base_cpus: list[float] = []
        results = {}
        for label, argv in COMMANDS.items():
            walls, cpus, wall_ratios, cpu_ratios = [], [], [], []
            for _ in range(args.runs):
                wall, cpu, _ = run(pem + argv, env)
                base_wall, base_cpu, _ = run(BASELINE, env)
                walls.append(wall)
                cpus.append(cpu)
                base_walls.append(base_wall)
                base_cpus.append(base_cpu)
                wall_ratios.append(wall / base_wall)
                cpu_ratios.append(cpu / base_cpu)
            results[label] = (walls, cpus, wall_ratios, cpu_ratios)
            print(f"{label:<18}{statistics.median(walls):>9.3f}{statistics.median(cpus):>9.3f}"
                  f"{statistics.median(wall_ratios):>11.3f}{statistics.median(cpu_ratios):>10.3f}")
        print(f"{'import torch':<18}{statistics.median(base_walls):>9.3f}{statistics.median(base_cpus):>9.3f}"
              f"{1.0:>11.3f}{1.0:>10.3f}")
        spread = max(max(r[2]) / min(r[2]) for r in results.values())
        if spread > 1.5:
            print(f"note: the wall ratios of one command vary up to {spread:.1f}x between runs: the machine is busy")

        if args.profile:
            for label, argv in COMMANDS.items():
                runs = []
                for _ in range(max(3, args.runs // 2)):
                    _, _, stderr = run([sys.executable, "-X", "importtime", "-m", "cli.main", *argv], env)
                    runs.append(import_profile(stderr))
                packages = set().union(*runs)
                least = {p: min(r.get(p, 0) for r in runs) for p in packages}  # the least disturbed run
                print(f"\n{label}: imports {sum(least.values()) / 1000:.0f} ms (importtime, each package's "
                      "own time, minimum over runs; largest first)")
                for package, us in sorted(least.items(), key=lambda item: -item[1])[:12]:
                    print(f"  {us / 1000:7.1f} ms  {package}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
