"""One worker start-up, in the one order that works, for every script that trains under a launcher.

    def train(session: Session) -> None:
        session.trainer.train(session.steps_left)

    sys.exit(run_worker(parse_args(), train, prog="train.py"))

`run_worker` does, in this order: validate the checkpoint flags and the collective timeout;
read the plan ($GRADACCUM_PLAN when a gradaccum launcher set it, where a batch flag that
disagrees with it is an error; else the flags with the live world size; a resumed run
re-solves the checkpoint's plan for this world size); initialise
torch.distributed; agree on the checkpoint (rank 0 finds it, every rank loads the same);
build the trainer of `--backend` (launcher.trainer_backends, through trainers.registry) with
`from_task`; resume; install the SIGUSR1/SIGTERM stop handlers; preflight (ranks agree on
plan, data and steps). Then it calls `train(session)`, and on success writes the final
checkpoint, lets the trainer go (DDP's reducer holds the process group) and shuts down
behind a barrier. A UserError on any rank prints one line and returns 2; a divergence of the
replicas returns 1. trainers/worker.py, examples/train.py and tests/scripts use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.plan import PLAN_ENV_VAR, PRECISIONS, BatchPlan
from launcher.trainer_backends import (
    DEFAULT_TRAINER_BACKEND,
    FSDP_BLOCKS_HELP,
    backend_names,
    check_blocks,
    trainer_backend,
    zero_stages,
)

if TYPE_CHECKING:
    from trainers.distributed import DistInfo
    from trainers.task import Task


def _workers(text: str) -> int:
    """--num-workers: a whole number >= 0, refused by argparse (exit 2) before any start-up."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (0: read on the training thread), got {text!r}")
    return n


def add_worker_args(parser: argparse.ArgumentParser, steps_default: int | None = 10) -> None:
    """The flags every worker script shares: task, plan, steps, precision, backend, data
    workers, metrics log, checkpoints."""
    parser.add_argument("--task", default="trainers.example:task", metavar="MODULE:FUNCTION")
    parser.add_argument("--global-batch-size", type=int, metavar="G")
    parser.add_argument("--micro-batch-size", type=int, metavar="M")
    parser.add_argument("--gradient-accumulation-steps", type=int, metavar="K")
    if steps_default is None:
        parser.add_argument("--steps", type=int, required=True, help="optimizer steps in all (a resumed run: the rest)")
    else:
        parser.add_argument(
            "--steps", type=int, default=steps_default, help=f"optimizer steps (default {steps_default})"
        )
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--precision", choices=PRECISIONS, help="fp32, bf16 or fp16 (default: the plan's, else fp32)")
    parser.add_argument(
        "--collective-timeout",
        type=float,
        metavar="SECONDS",
        help="a rank that stops answering (or never arrives at the rendezvous) this long ends the job, "
        "which names it (default 300)",
    )
    parser.add_argument(
        "--backend",
        choices=backend_names(),
        default=DEFAULT_TRAINER_BACKEND,
        help=f"distributed trainer (default {DEFAULT_TRAINER_BACKEND})",
    )
    parser.add_argument(
        "--zero-stage", type=int, choices=zero_stages(), help="deepspeed: ZeRO stage (default: JSON's, or 0)"
    )
    parser.add_argument(
        "--deepspeed-config",
        metavar="FILE",
        default=os.environ.get("GRADACCUM_DEEPSPEED_CONFIG"),
        help="deepspeed: your DeepSpeed JSON, merged under the plan (default $GRADACCUM_DEEPSPEED_CONFIG)",
    )
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        help="rank 0 writes metrics.csv (one row per optimizer step; TensorBoard events when installed) here",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (drawn only when stderr is a terminal)"
    )
    parser.add_argument(
        "--num-workers",
        type=_workers,
        metavar="N",
        help="processes reading and collating the next step off the training thread (default: the task's, 0)",
    )
    parser.add_argument("--fsdp-blocks", metavar="SPEC", help=FSDP_BLOCKS_HELP)
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    from trainers.resume import add_checkpoint_args

    add_checkpoint_args(parser)


@dataclasses.dataclass
class Session:
    """What a started worker has: its flags, plan, process group and trainer (resumed)."""

    args: argparse.Namespace
    plan: BatchPlan
    info: DistInfo
    trainer: Any
    resumed_from: os.PathLike[str] | None = None

    @property
    def rank0(self) -> bool:
        return self.info.rank == 0

    @property
    def steps_left(self) -> int:
        """--steps is the total: a resumed run trains what is left."""
        return max(0, self.args.steps - self.trainer.global_step)


def resolve_worker_plan(args: argparse.Namespace, world_size: int, resume_from: os.PathLike[str] | None) -> BatchPlan:
    """The flags' plan at the live world size; a resumed run keeps the checkpoint's global batch."""
    from trainers.resume import checkpoint_plan, plan_for_resume

    g, m, k = args.global_batch_size, args.micro_batch_size, args.gradient_accumulation_steps
    if resume_from is not None:
        return plan_for_resume(checkpoint_plan(resume_from), world_size, g, m, k)
    if g is None and m is None:
        raise UserError("no plan: run under `gradaccum launch` or give --global-batch-size/--micro-batch-size")
    return BatchPlan.solve(g, m, k, world_size=world_size)


#: the script's batch flags and the plan fields they set
BATCH_FLAGS = (
    ("global_batch_size", "--global-batch-size"),
    ("micro_batch_size", "--micro-batch-size"),
    ("gradient_accumulation_steps", "--gradient-accumulation-steps"),
)


def check_flags_agree_with_plan(args: argparse.Namespace, plan: BatchPlan, source: str) -> None:
    """A batch flag the script was given must say what the launcher's plan says.

    The launcher's plan wins (every rank and the DeepSpeed JSON were made from it), so a
    flag that disagrees would otherwise be silently ignored: refuse it, naming both values.
    Flags that agree are fine (a script line that works with and without the launcher).
    """
    differ = [
        f"{flag} {given} but the plan has {getattr(plan, name)}"
        for name, flag in BATCH_FLAGS
        if (given := getattr(args, name, None)) is not None and given != getattr(plan, name)
    ]
    if differ:
        raise UserError(
            f"the script's batch flags disagree with the launcher's plan ({source}: global "
            f"{plan.global_batch_size} = micro {plan.micro_batch_size} × accumulation "
            f"{plan.gradient_accumulation_steps} × data-parallel {plan.data_parallel_size}): {'; '.join(differ)}. "
            "Give the batch sizes to `gradaccum launch` (it writes the plan), or drop them from the script's arguments"
        )


def _backend_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer arguments only some backends take, checked against the registry."""
    backend = trainer_backend(args.backend)
    sync = getattr(args, "sync_every_micro_step", False)
    if backend.zero_stages:  # DeepSpeed-like: the engine decides when it communicates
        if sync:
            raise UserError("--sync-every-micro-step is a DDP demonstration; DeepSpeed decides when it communicates")
        return {"zero_stage": args.zero_stage, "ds_config": args.deepspeed_config}
    blocks = getattr(args, "fsdp_blocks", None)
    check_blocks(args.backend, blocks)
    return {**({"sync_every_micro_step": True} if sync else {}), **({"fsdp_blocks": blocks} if blocks else {})}


def start(args: argparse.Namespace, task: Task | None = None, trainer_class: type | None = None) -> Session:
    """Everything before the first step (see the module docstring), on every rank."""
    from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, check_collective_timeout, init_distributed
    from trainers.registry import trainer_class as registered_class
    from trainers.resume import agree_on_checkpoint, check_checkpoint_args, install_stop_handlers
    from trainers.task import load_task

    checkpoint_kwargs = check_checkpoint_args(args)
    timeout = check_collective_timeout(args.collective_timeout) or DEFAULT_COLLECTIVE_TIMEOUT_S
    extra = _backend_kwargs(args)
    plan = BatchPlan.from_env()
    if plan is not None:  # before the rendezvous: every rank refuses at once, nobody waits
        check_flags_agree_with_plan(args, plan, f"${PLAN_ENV_VAR}={os.environ[PLAN_ENV_VAR]}")
    info = init_distributed(plan, collective_timeout=timeout)  # plan: its world size is checked now
    resume_from = None
    if args.resume:
        start_over = getattr(args, "start_over_if_corrupt", False)
        resume_from = agree_on_checkpoint(args.resume, args.checkpoint_dir, start_over_if_corrupt=start_over)
    if plan is None:
        plan = resolve_worker_plan(args, info.world_size, resume_from)
    cls = trainer_class or registered_class(args.backend)
    trainer = cls.from_task(
        task if task is not None else load_task(args.task),
        plan,
        precision=args.precision,
        collective_timeout=timeout,
        shuffle=not args.no_shuffle,
        log_dir=args.log_dir,
        progress=not args.no_progress,
        **({} if args.num_workers is None else {"num_workers": args.num_workers}),
        count_collectives=True,  # the gradient all-reduce rounds per step are reported
        **checkpoint_kwargs,
        **extra,
    )
    if resume_from is not None:
        trainer.resume(resume_from, lr_scaling=args.lr_scaling)
    install_stop_handlers(trainer)  # SIGUSR1/SIGTERM: checkpoint after this step, stop
    trainer.preflight(args.steps)  # ranks agree on plan, data and steps before the first one
    return Session(args, plan, info, trainer, resume_from)


def run_worker(
    args: argparse.Namespace,
    train: Callable[[Session], None],
    *,
    prog: str,
    task: Task | None = None,
    trainer_class: type | None = None,
    check_replicas: bool = False,
) -> int:
    """Start, `train(session)`, save the final checkpoint and shut down; the exit status.

    `check_replicas`: after training, every rank compares its parameters with rank 0's
    (the same decisions everywhere, e.g. skipped fp16 steps); a divergence returns 1.
    """
    from trainers.distributed import ReplicaDivergence, shutdown

    try:
        session = start(args, task, trainer_class)
        train(session)
        from trainers.resume import save_final

        save_final(session.trainer)
        if check_replicas:
            from trainers.distributed import check_replicas as compare_replicas

            compare_replicas(session.trainer.strategy.replicated_parameters())
        session.trainer.close()  # data workers stopped, metrics.csv closed
        session.trainer = None  # DDP's reducer holds the process group: let it go before the group does
        del session
        shutdown(barrier=True)  # no rank tears down its connections while another still writes
        return 0
    except UserError as e:
        print(f"{prog} (rank {os.environ.get('RANK', '0')}): error: {e}", file=sys.stderr, flush=True)
        return 2
    except ReplicaDivergence as e:
        print(f"{prog} (rank {os.environ.get('RANK', '0')}): error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()


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
