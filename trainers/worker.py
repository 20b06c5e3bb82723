"""The distributed half of `gradaccum verify`: one process per rank, started by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node P -m trainers.worker \
        --task MODULE:FUNCTION --steps S --output-dir DIR      # plan from $GRADACCUM_PLAN

Rank 0 writes the model's state_dict before the first step (step-000000.pt) and after
every optimizer step (step-000001.pt, ...), each with that step's metrics, atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.plan import PRECISIONS, BatchPlan


def step_path(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"step-{step:06d}.pt"


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.worker", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="trainers.example:task")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--sync-every-micro-step", action="store_true", help="disable no_sync (the naive loop)")
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--precision", choices=PRECISIONS, help="default: the plan's (fp32)")
    p.add_argument(
        "--collective-timeout", type=float, metavar="SECONDS", help="hang watchdog and process-group timeout"
    )
    from trainers.resume import add_checkpoint_args

    add_checkpoint_args(p)
    # gradaccum verify --interrupt-at-step S: every rank waits here after step S's checkpoint
    # until verify SIGKILLs the whole run (see trainers/interrupt.py)
    p.add_argument("--hold-after-step", type=int, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=("ddp", "deepspeed"), default="ddp", help="distributed trainer (default ddp)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), help="deepspeed: ZeRO stage (default: JSON's, or 0)")
    p.add_argument(
        "--deepspeed-config",
        metavar="FILE",
        default=os.environ.get("GRADACCUM_DEEPSPEED_CONFIG"),
        help="deepspeed: a DeepSpeed JSON merged under the plan (default $GRADACCUM_DEEPSPEED_CONFIG)",
    )
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from trainers.ddp import DDPTrainer
    from trainers.distributed import (
        DEFAULT_COLLECTIVE_TIMEOUT_S,
        check_collective_timeout,
        check_replicas,
        init_distributed,
        log_rank0,
        shutdown,
    )
    from trainers.resume import (
        agree_on_checkpoint,
        check_checkpoint_args,
        checkpoint_plan,
        install_stop_handlers,
        plan_for_resume,
        save_final,
    )
    from trainers.task import load_task

    checkpoint_kwargs = check_checkpoint_args(args)
    timeout = check_collective_timeout(args.collective_timeout) or DEFAULT_COLLECTIVE_TIMEOUT_S
    plan = BatchPlan.from_env()
    resume_from = None
    if args.resume:
        init_distributed(collective_timeout=timeout)
        resume_from = agree_on_checkpoint(args.resume, args.checkpoint_dir)
    if plan is None:
        info = init_distributed(collective_timeout=timeout)
        g, m, k = args.global_batch_size, args.micro_batch_size, args.gradient_accumulation_steps
        if resume_from is not None:  # same global batch, re-solved for this world size
            plan = plan_for_resume(checkpoint_plan(resume_from), info.world_size, g, m, k)
        else:
            plan = BatchPlan.solve(g, m, k, world_size=info.world_size)
    task = load_task(args.task)
    if args.backend == "deepspeed":
        if args.sync_every_micro_step:
            raise UserError("--sync-every-micro-step is a DDP demonstration; DeepSpeed decides when it communicates")
        from trainers.deepspeed_trainer import DeepSpeedTrainer

        trainer = DeepSpeedTrainer.from_task(
            task,
            plan,
            zero_stage=args.zero_stage,
            ds_config=args.deepspeed_config,
            precision=args.precision,
            collective_timeout=timeout,
            shuffle=not args.no_shuffle,
            count_collectives=True,  # gradaccum verify reports the gradient communication rounds
            **checkpoint_kwargs,
        )
    else:
        trainer = DDPTrainer.from_task(
            task,
            plan,
            precision=args.precision,
            collective_timeout=timeout,
            shuffle=not args.no_shuffle,
            sync_every_micro_step=args.sync_every_micro_step,
            count_collectives=True,  # gradaccum verify reports the gradient communication rounds
            **checkpoint_kwargs,
        )
    if resume_from is not None:
        trainer.resume(resume_from, lr_scaling=args.lr_scaling)
    install_stop_handlers(trainer)
    trainer.preflight(args.steps)  # ranks agree on plan, data and steps before the first one
    rank0 = dist.get_rank() == 0
    out = Path(args.output_dir)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    if rank0 and trainer.global_step == 0:
        save_atomic({"step": 0, "world_size": plan.world_size, "model": trainer.module.state_dict()}, step_path(out, 0))
    while trainer.global_step < args.steps:
        metrics = trainer.train(1)
        if rank0:
            record = {"step": metrics.step, "world_size": plan.world_size, "metrics": metrics.to_dict()}
            record["model"] = trainer.module.state_dict()
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
            from trainers.interrupt import hold_until_killed

            hold_until_killed(out, metrics.step)
    save_final(trainer)
    check_replicas(trainer.module.parameters())  # same decisions on every rank (e.g. skipped fp16 steps)
    del trainer  # DDP's reducer holds the process group: let it go before the group does
    shutdown(barrier=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainers.distributed import ReplicaDivergence, shutdown

    try:
        return run(args)
    except UserError as e:
        rank = os.environ.get("RANK", "?")
        print(f"gradaccum worker (rank {rank}): error: {e}", file=sys.stderr, flush=True)
        return 2
    except ReplicaDivergence as e:
        print(f"gradaccum worker (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    exit_worker(main())
