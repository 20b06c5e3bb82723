"""What verify's parent and its workers (trainers/worker.py) agree on, in one place.

Layout of the output directory:

    DIR/plan.json                      the plan of the first run ($GRADACCUM_PLAN of the workers)
    DIR/plan-resumed-worldP.json       the plan of a resumed run at P processes
    DIR/distributed-steps/step-000000.pt   rank 0: the model before the first step
    DIR/distributed-steps/step-00000S.pt   rank 0: after step S, with its metrics
    DIR/distributed-steps/held.json    --hold-after-step: every rank waits to be killed
    DIR/checkpoints/                   --interrupt-at-step: the run's checkpoints
    DIR/metrics.csv                    rank 0: one row per optimizer step of the distributed run
                                       (appended by a resumed run; trainers/metrics_log.py)
    DIR/initial.pt reference.pt distributed.pt report.json loss-curve.png   the results

A run owns these: `clear_previous_run` removes an earlier run's before anything is written,
so a directory never mixes two runs (a failed run leaves no earlier loss curve behind);
checkpoints/ is cleared by --interrupt-at-step only (without it, the directory may be the
user's own). Every file is written under a temporary name and renamed (save_atomic,
write_json_atomic). The worker's command line is
`WorkerArgs`: the parent builds argv with `to_argv()`, the worker parses it with
`worker_parser()`, whose flags are the fields' names (tests check the round trip).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, NoReturn

from launcher.atomic import write_json_atomic
from launcher.errors import UserError
from launcher.trainer_backends import DEFAULT_TRAINER_BACKEND
from trainers.startup import add_worker_args

STEPS_DIR = "distributed-steps"
HELD = "held.json"  # written by rank 0 when every rank holds after step S
CHECKPOINTS_DIR = "checkpoints"
HOLD_LIMIT_S = 300.0


#: the files a verify run writes into its output directory (besides STEPS_DIR)
RESULT_FILES = (
    "initial.pt",
    "reference.pt",
    "distributed.pt",
    "report.json",
    "plan.json",
    "loss-curve.png",
    "metrics.csv",  # trainers.metrics_log.CSV_NAME: a new run must not append to an old one's rows
)
RESULT_GLOBS = ("plan-resumed-world*.json", "events.out.tfevents.*")


def clear_previous_run(out: Path) -> None:
    """Remove what an earlier verify run wrote into `out` (and nothing else)."""
    for path in [out / name for name in RESULT_FILES] + [p for g in RESULT_GLOBS for p in out.glob(g)]:
        path.unlink(missing_ok=True)
    if (out / STEPS_DIR).is_dir():
        shutil.rmtree(out / STEPS_DIR)


def step_path(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"step-{step:06d}.pt"


def plan_path(out: Path, world_size: int, resumed: bool) -> Path:
    return out / (f"plan-resumed-world{world_size}.json" if resumed else "plan.json")


def load_steps(steps_dir: Path, steps: int) -> list[dict[str, Any]]:
    """The records rank 0 wrote, from step 0 up to the first one missing."""
    import torch

    records = []
    for step in range(steps + 1):
        path = step_path(steps_dir, step)
        if not path.exists():
            break
        records.append(torch.load(path, map_location="cpu", weights_only=True))
    return records


@dataclasses.dataclass
class WorkerArgs:
    """The worker's command line; each field is the flag `--field-name` (True: a bare flag)."""

    task: str
    steps: int
    output_dir: str
    no_shuffle: bool = False
    sync_every_micro_step: bool = False
    collective_timeout: float | None = None
    backend: str = DEFAULT_TRAINER_BACKEND
    zero_stage: int | None = None
    deepspeed_config: str | None = None
    fsdp_blocks: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_last: int | None = None
    resume: str | None = None
    log_dir: str | None = None
    no_progress: bool = False
    #: every rank waits after this step's checkpoint until verify SIGKILLs the run
    hold_after_step: int | None = None

    def to_argv(self) -> list[str]:
        argv = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or value is False or value == field.default:
                continue
            flag = "--" + field.name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> WorkerArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def worker_parser() -> argparse.ArgumentParser:
    """The worker's flags: every worker's (trainers.startup) plus verify's own."""
    p = argparse.ArgumentParser(
        prog="python -m trainers.worker", description="The distributed half of `gradaccum verify`"
    )
    add_worker_args(p, steps_default=None)
    p.add_argument("--output-dir", required=True, help="rank 0 writes step-NNNNNN.pt here")
    p.add_argument("--sync-every-micro-step", action="store_true", help="disable no_sync (the naive loop)")
    p.add_argument("--hold-after-step", type=int, metavar="S", help=argparse.SUPPRESS)
    return p


def hold_until_killed(steps_dir: str | os.PathLike[str], step: int, limit_s: float = HOLD_LIMIT_S) -> NoReturn:
    """Every rank: wait to be SIGKILLed after step `step` (its checkpoint is complete)."""
    import torch.distributed as dist

    dist.barrier()  # rank 0 has written step `step`'s record; every rank is past the save
    if dist.get_rank() == 0:
        write_json_atomic(Path(steps_dir) / HELD, {"step": step, "pid": os.getpid()})
    parent = os.getppid()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and os.getppid() == parent:  # the agent died: stop waiting
        time.sleep(0.1)
    raise UserError(f"held after step {step} for up to {limit_s:.0f} s but nobody killed the run (verify gone?)")
