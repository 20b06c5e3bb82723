"""The distributed half of `gradaccum verify`: one process per rank, started by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node P -m trainers.worker \
        --task MODULE:FUNCTION --steps S --output-dir DIR      # plan from $GRADACCUM_PLAN

Rank 0 writes the model's state_dict before the first step (step-000000.pt) and after
every optimizer step (step-000001.pt, ...), each with that step's metrics, atomically
(trainers/verify/protocol.py has the files and the flags).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.startup import Session, run_worker, save_atomic
from trainers.verify.protocol import hold_until_killed, step_path, worker_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return worker_parser().parse_args(argv)


def full_state_dict(trainer) -> dict:
    """The model's full state_dict with its own keys. Every rank calls it: a trainer whose
    model is sharded (DeepSpeed ZeRO 3) gathers it with `fp32_state_dict()`, a collective."""
    gather = getattr(trainer, "fp32_state_dict", None)
    return gather() if gather is not None else trainer.module.state_dict()


def record_steps(session: Session) -> None:
    """Train to --steps, rank 0 writing every step's record; hold after --hold-after-step."""
    from trainers.distributed import log_rank0

    args, trainer, plan = session.args, session.trainer, session.plan
    out = Path(args.output_dir)
    if trainer.global_step == 0:
        initial = full_state_dict(trainer)  # every rank: a collective when the model is sharded
        if session.rank0:
            out.mkdir(parents=True, exist_ok=True)
            save_atomic({"step": 0, "world_size": plan.world_size, "model": initial}, step_path(out, 0))
    elif session.rank0:
        out.mkdir(parents=True, exist_ok=True)
    for metrics in trainer.iter_steps(session.steps_left):
        state = full_state_dict(trainer)
        if session.rank0:
            record = {"step": metrics.step, "world_size": plan.world_size, "metrics": metrics.to_dict()}
            record["model"] = state
            if getattr(trainer, "last_collective_calls", None) is not None:  # DeepSpeed: calls per collective
                record["collective_calls"] = trainer.last_collective_calls
            save_atomic(record, step_path(out, metrics.step))
        log_rank0(
            f"distributed: step {metrics.step}/{args.steps}  loss {metrics.loss:.6f}  "
            f"all-reduce rounds {metrics.allreduce_rounds}"
        )
        if trainer.stopped:
            break
        if metrics.step == args.hold_after_step:
            hold_until_killed(out, metrics.step)


def main(argv: list[str] | None = None) -> int:
    # check_replicas: the same decisions on every rank (e.g. skipped fp16 steps)
    return run_worker(parse_args(argv), record_steps, prog="gradaccum worker", check_replicas=True)


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    exit_worker(main())
