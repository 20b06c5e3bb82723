"""Benchmark 5, launch latency.

- `gradaccum plan` and `gradaccum launch --dry-run`: wall time of the real CLI, next to a
  bare `python -c pass` and `python -c "import torch"` measured in the same rounds, and a
  check (`python -X importtime`) that neither command imports torch. Target: no torch.
- `gradaccum launch --launcher torchrun` vs the bare `torchrun` command it builds, each
  running examples/train.py on 2 processes: wall time from start to the first training
  step's line. Reported, no target: the difference is gradaccum's own start-up (solve and
  write the plan, pick a port) plus its Python process.
"""

from __future__ import annotations

import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    Target,
    child_env,
    free_port,
    paired_ratios,
    shuffled,
    summary,
    time_command,
    time_to_line,
)

NAME = "launch"
BIN = Path(sys.executable).parent
PLAN_ARGS = ["plan", "--global-batch-size", "24", "--micro-batch-size", "4", "--world-size", "2"]
TRAIN = ["examples/train.py", "--steps", "2", "--no-shuffle"]
BATCH = ["--global-batch-size", "8", "--micro-batch-size", "2"]
DRY_RUN_ARGS = ["launch", "--launcher", "torchrun", "--nproc-per-node", "2", *BATCH, "--dry-run", "--", *TRAIN]


def gradaccum(*args: str) -> list[str]:
    script = BIN / "gradaccum"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "launcher", *args]


def torch_modules_imported(args: list[str]) -> list[str]:
    """Modules named torch or torch.* that `python -X importtime -m launcher ARGS` imports."""
    argv = [sys.executable, "-X", "importtime", "-m", "launcher", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"gradaccum {' '.join(args)} failed: {proc.stderr[-2000:]}")
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return [n for n in names if n == "torch" or n.startswith("torch.")]


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "gradaccum plan": gradaccum(*PLAN_ARGS),
        "gradaccum launch --dry-run": gradaccum(*DRY_RUN_ARGS),
    }
    cli_s: dict[str, list[float]] = {name: [] for name in commands}
    rng = random.Random(0)
    for _ in range(cfg["reps"]):
        for name in shuffled(list(commands), rng):
            cli_s[name].append(time_command(commands[name]))

    torchrun = str(BIN / "torchrun")
    first_step: dict[str, list[float]] = {"torchrun": [], "gradaccum launch": []}
    with tempfile.TemporaryDirectory(prefix="gradaccum-bench-") as tmp:
        for rep in range(cfg["first_step_reps"]):
            for name in shuffled(list(first_step), rng):
                if name == "torchrun":
                    # what `gradaccum launch --dry-run` prints, with the plan as flags instead of a file
                    argv = [torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
                    argv += ["--master-port", str(free_port()), *TRAIN, *BATCH]
                else:
                    argv = gradaccum("launch", "--launcher", "torchrun", "--nproc-per-node", "2", *BATCH)
                    argv += ["--run-dir", str(Path(tmp) / f"rep{rep}"), "--", *TRAIN]
                first_step[name].append(time_to_line(argv, "step 1 "))
    return {
        "commands": {name: shlex.join(argv) for name, argv in commands.items()},
        "cli_seconds": cli_s,
        "first_step_seconds": first_step,
        "torch_imported": {
            "gradaccum plan": torch_modules_imported(PLAN_ARGS),
            "gradaccum launch --dry-run": torch_modules_imported(DRY_RUN_ARGS),
        },
    }


def summarize(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    cli = raw["cli_seconds"]
    first = raw["first_step_seconds"]
    result = {
        "commands": raw["commands"],
        "cli_seconds": {name: summary(v) for name, v in cli.items()},
        "plan_over_import_torch": paired_ratios(cli["gradaccum plan"], cli['python -c "import torch"']),
        "dry_run_over_import_torch": paired_ratios(cli["gradaccum launch --dry-run"], cli['python -c "import torch"']),
        "torch_imported": raw["torch_imported"],
    }
    if first["torchrun"]:
        result["first_step_seconds"] = {name: summary(v) for name, v in first.items()}
        result["launch_over_torchrun"] = paired_ratios(first["gradaccum launch"], first["torchrun"])
    else:
        result["first_step_skipped"] = "not run with --quick (two 2-process launches: six torch imports)"
    targets = [
        Target(
            f"{name}: torch modules imported",
            float(len(mods)),
            0.0,
            "<=",
            "python -X importtime -m launcher ...",
            ", ".join(mods[:5]),
        )
        for name, mods in raw["torch_imported"].items()
    ]
    return result, targets
