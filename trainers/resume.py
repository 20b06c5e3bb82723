"""Trainer checkpoints: save, resume (also at another world size or global batch), stop on a signal.

`Checkpointing` is the trainer's checkpoint component: it owns where and how often to
save, the last step saved and the stop request; `Trainer.save / resume /
request_checkpoint_and_stop` call it. The files themselves are written by
`trainers.checkpoint` (atomic, verified, `latest` pointer); what goes in them is
`Trainer.state_dict()` (each component's part) plus the strategy's own files.

What a checkpoint holds: model, optimizer, LR scheduler, the GlobalBatchSampler position
(in global batches, so it is valid at any world size), the step counter and the plan
(trainer.pt, rank 0 only), plus every rank's RNG states (torch, numpy, python).

Resuming:
  - same world size: bit-for-bit the uninterrupted run (CPU, fp32);
  - another world size, same global batch: the plan is re-solved with
    `BatchPlan.with_world_size` (accumulation, and if needed the micro-batch, change) and the
    sampler continues with the next global batch, so the updates are the same up to the
    summation order of the all-reduce (fp32: relative 1e-7 here);
  - another global batch (the user asked for it): the sampler continues at the first item
    not yet consumed and the learning rate is rescaled (`launcher.lr.LRRule`, linear by
    default), which the log states.

Stopping (pre-emption): `install_stop_handlers(trainer)` makes SIGUSR1/SIGTERM call
`trainer.request_checkpoint_and_stop()`. At every step boundary the ranks all-reduce (MAX)
their stop flags, so a signal seen by any one rank stops every rank after the same step;
train() then writes a checkpoint (when `checkpoint_dir` is set) and returns with
`trainer.stopped = True`. A second signal of the same kind takes its default action.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.lr import LRRule
from launcher.plan import BatchPlan
from trainers.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

if TYPE_CHECKING:
    from trainers.trainer import Trainer

AUTO = "auto"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


# ------------------------------------------------------------------ process group
def _group() -> tuple[int, int]:
    """(rank, world size) of the live process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    import torch.distributed as dist

    return dist.barrier if _group()[1] > 1 else None


# ------------------------------------------------------------------ which checkpoint
def find_checkpoint(
    resume: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str] | None = None,
    *,
    start_over_if_corrupt: bool = False,
) -> Path | None:
    """This process's answer: "auto" -> the newest complete checkpoint under `checkpoint_dir`
    (None when there is none yet: a first start; an error when there are some but none loads,
    unless `start_over_if_corrupt`); a path -> that checkpoint, or a root's newest."""
    if str(resume) == AUTO and checkpoint_dir is None:
        raise UserError("--resume auto needs --checkpoint-dir (where to look for checkpoints)")
    # Damaged checkpoints are skipped with a warning: say it as a log line, not as a
    # Python warning pointing into this file.
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        if str(resume) == AUTO:
            found = latest_checkpoint(checkpoint_dir, start_over_if_corrupt=start_over_if_corrupt)
        else:
            found = resolve_checkpoint(resume)
    for warning in skipped:
        print(f"gradaccum: warning: {warning.message}", file=sys.stderr, flush=True)
    return found


def agree_on_checkpoint(
    resume: str | os.PathLike[str] | None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    *,
    start_over_if_corrupt: bool = False,
) -> Path | None:
    """`find_checkpoint` on rank 0, broadcast to every rank (so all load the same one).

    Call it on every rank once the process group is up; an error on rank 0 is raised on all.
    """
    if resume is None:
        return None
    rank, world = _group()
    if world == 1:
        return find_checkpoint(resume, checkpoint_dir, start_over_if_corrupt=start_over_if_corrupt)
    import torch.distributed as dist

    answer: list[Any] = [None]
    if rank == 0:
        try:
            found = find_checkpoint(resume, checkpoint_dir, start_over_if_corrupt=start_over_if_corrupt)
            answer = [("path", str(found) if found is not None else None)]
        except UserError as e:
            answer = [("error", str(e))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(value) if value is not None else None


def checkpoint_plan(path: str | os.PathLike[str]) -> BatchPlan:
    """The plan a checkpoint was written with (from its manifest)."""
    manifest = read_manifest(path)
    if manifest.get("plan") is None:
        raise CheckpointError(f"{Path(path) / 'manifest.json'} holds no batch plan: not a trainer checkpoint")
    return BatchPlan.from_dict(manifest["plan"])


def plan_for_resume(
    saved: BatchPlan,
    world_size: int,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> BatchPlan:
    """The plan to resume with at `world_size`.

    Flags that repeat the checkpoint's plan (or none) keep its global batch: the plan is
    re-solved with `with_world_size` (which names the compatible world sizes when the
    global batch cannot be kept). Other flags are the user's new plan; a new global batch
    without a micro-batch keeps the micro-batch at most the saved one (memory never grows).
    """
    g = saved.global_batch_size if global_batch_size is None else global_batch_size
    m, k = micro_batch_size, gradient_accumulation_steps
    if g == saved.global_batch_size:
        if m in (None, saved.micro_batch_size) and k in (None, saved.gradient_accumulation_steps):
            return saved.with_world_size(world_size)
        saved.with_world_size(world_size)  # the global batch must fit this world at all
        return BatchPlan.solve(g, m, k, world_size=world_size)
    if m is None and k is None:
        return BatchPlan.solve(g, world_size=world_size, max_micro_batch_size=saved.micro_batch_size)
    return BatchPlan.solve(g, m, k, world_size=world_size)


def describe_change(saved: BatchPlan, plan: BatchPlan) -> str:
    def triad(p: BatchPlan) -> str:
        return (
            f"global {p.global_batch_size} = micro {p.micro_batch_size} × accumulation "
            f"{p.gradient_accumulation_steps} × data-parallel {p.data_parallel_size}"
        )

    if saved == plan:
        return f"same plan ({triad(plan)})"
    return f"plan {triad(saved)} at world size {saved.world_size} -> {triad(plan)} at world size {plan.world_size}"


# ------------------------------------------------------------------ the component
class Checkpointing:
    """Periodic checkpoints, resume and the agreed stop of one trainer (every rank has one)."""

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, every: int = 0, keep_last: int | None = None
    ) -> None:
        self.directory = directory
        self.every = every
        self.keep_last = keep_last
        self.last_step: int | None = None  # the step of the newest checkpoint written or loaded
        self.stop_agreement = False  # all-reduce stop requests at each step (install_stop_handlers)
        self.stop_requested = False
        self.stopped = False  # the loop ended early on a stop request

    def request_stop(self) -> None:
        """Safe in a signal handler: only sets a flag."""
        self.stop_requested = True

    def save(self, trainer: Trainer, root: str | os.PathLike[str] | None = None) -> Path:
        """Every rank calls it: rank 0 writes the replicated state, each rank its RNG state."""
        root = root if root is not None else self.directory
        if root is None:
            raise UserError("no checkpoint directory: pass save(root) or checkpoint_dir= to the trainer")
        rank, world = _group()
        meta: dict[str, Any] = {"backend": type(trainer).__name__}
        if trainer.data is not None:
            meta["samples_consumed"] = trainer.data.consumed_samples
        if trainer.optimizer is not None:
            meta["lr"] = trainer.optimizer.param_groups[0].get("lr")
        path = save_checkpoint(
            root,
            trainer.global_step,
            trainer.state_dict() if rank == 0 else None,
            rank=rank,
            world_size=world,
            plan=trainer.plan,
            rank_state=rng_state(),
            barrier=_barrier(),
            keep_last=self.keep_last,
            write_extra=trainer.strategy.write_files,
            meta=meta,
        )
        self.last_step = trainer.global_step
        return path

    def resume(self, trainer: Trainer, path_or_root: str | os.PathLike[str], lr_scaling: str | LRRule) -> Path | None:
        """See Trainer.resume. Returns the checkpoint directory, or None ("auto", none yet)."""
        path = agree_on_checkpoint(path_or_root, self.directory)
        if path is None:
            trainer.log(f"gradaccum: no checkpoint under {self.directory} yet: starting from step 0")
            return None
        rank, world = _group()
        # Rank 0 verified every file (size and sha256) while choosing; the others trust that.
        manifest = read_manifest(path)
        same_world = manifest["world_size"] == world
        state, rank_state, manifest = load_checkpoint(path, rank=rank if same_world else 0, verify=False)
        saved = BatchPlan.from_dict(manifest.get("plan") or state["plan"])
        trainer.strategy.read_files(path)
        trainer.load_state_dict({**state, "sampler": None})
        new_global = saved.global_batch_size != trainer.plan.global_batch_size
        if trainer.data is not None and state.get("sampler") is not None:
            trainer.data.load_state_dict(state["sampler"], allow_new_global_batch=new_global)
        if rank_state is not None:
            set_rng_state(rank_state)
        self.stop_requested = self.stopped = False
        self.last_step = trainer.global_step
        notes = [
            f"gradaccum: resumed from {path} at step {trainer.global_step}: {describe_change(saved, trainer.plan)}"
        ]
        if not same_world:
            notes.append(
                f"world size {manifest['world_size']} -> {world}: the global batch order is unchanged; "
                "RNG states taken from rank 0's file"
            )
        if new_global and trainer.optimizer is not None:
            notes.append(
                rescale_learning_rate(
                    trainer.optimizer,
                    trainer.scheduler,
                    saved.global_batch_size,
                    trainer.plan.global_batch_size,
                    lr_scaling,
                )
            )
            if trainer.data is not None:
                notes.append(f"the data continues at item {trainer.data.consumed_samples} of the sample stream")
        trainer.log("\n  ".join(notes))
        return path

    def stop_agreed(self, device: Any) -> bool:
        """Whether any rank asked to stop; one tiny all-reduce when stop requests are enabled."""
        local = self.stop_requested
        if not self.stop_agreement or _group()[1] == 1:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def after_step(self, trainer: Trainer, step: int) -> bool:
        """Periodic checkpoint, then the agreed stop; True means the loop ends now."""
        stop = self.stop_agreed(trainer.device)
        due = bool(self.every) and step % self.every == 0
        if self.directory is not None and (due or stop) and self.last_step != step:
            trainer.hang.at(step, "checkpoint")  # a hang report then says where the ranks were
            self.save(trainer)
        if stop:
            self.stopped = True
            where = f"checkpoint step {step} written" if self.directory is not None else "no checkpoint_dir"
            trainer.log(f"gradaccum: stop requested: stopping after step {step} ({where})")
        return stop

    def save_final(self, trainer: Trainer) -> Path | None:
        """A checkpoint of the last step unless one was just written (end of a run)."""
        if self.directory is None or self.last_step == trainer.global_step:
            return None
        return self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state.get("last_step")


def rescale_learning_rate(
    optimizer: Any, scheduler: Any, old_global: int, new_global: int, rule: str | LRRule = "linear"
) -> str:
    """Scale every param group's lr (and a scheduler's base lrs) for a new global batch.

    The optimizer's lr was right for `old_global`; a rule name means "scale from there".
    Returns the sentence the log shows.
    """
    lr = float(optimizer.param_groups[0]["lr"])
    if isinstance(rule, str):
        # only the ratio matters here; base_lr is a placeholder the rule needs
        rule = LRRule(rule, base_lr=1.0, base_batch_size=old_global) if rule != "none" else LRRule()
    factor = rule.factor(new_global) / rule.factor(old_global)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        # LambdaLR & co. recompute lr = base_lr × schedule(step): scale the base, keep the schedule.
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return (
        f"global batch {old_global} -> {new_global}: learning rate {lr:.6g} -> {lr * factor:.6g} "
        f"(× {factor:.6g}, {rule.rule} scaling{'' if rule.rule != 'none' else ': unchanged'})"
    )


# ------------------------------------------------------------------- stop signals
def install_stop_handlers(trainer: Trainer, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
    """SIGUSR1/SIGTERM -> checkpoint after the current step and stop (every rank, same step).

    Install it on every rank (it turns on the per-step all-reduce of the stop flag, which
    every rank must join). A second signal of the same kind takes the default action, so a
    rank stuck in a collective can still be terminated.
    """
    trainer.checkpoints.stop_agreement = True

    def handler(signum: int, _frame: Any) -> None:
        if trainer.checkpoints.stop_requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        trainer.request_checkpoint_and_stop()

    for sig in signals:
        signal.signal(sig, handler)


def save_final(trainer: Trainer) -> Path | None:
    """A checkpoint of the last step unless one was just written (end of a run)."""
    return trainer.checkpoints.save_final(trainer)


# ----------------------------------------------------------------------- CLI flags
def add_checkpoint_args(parser: Any) -> None:
    """--checkpoint-dir, --checkpoint-every, --keep-last, --resume, --lr-scaling (worker, examples)."""
    from launcher.lr import LR_RULES

    g = parser.add_argument_group("checkpoints and resume")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="write checkpoints here (atomic; `latest` names the newest)")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="checkpoint every N optimizer steps (default 0: at the end and on SIGUSR1/SIGTERM only)",
    )
    g.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N checkpoints (default: all)")
    g.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: the newest complete checkpoint under --checkpoint-dir (none yet: start at step 0; "
        "some but none loads: an error listing them); PATH: that checkpoint, or the newest complete one "
        "under that root",
    )
    g.add_argument(
        "--start-over-if-corrupt",
        action="store_true",
        help="with --resume auto: when every checkpoint under --checkpoint-dir is damaged, warn and start "
        "at step 0 instead of stopping",
    )
    g.add_argument(
        "--lr-scaling",
        choices=LR_RULES,
        default="linear",
        help="when resuming with a new global batch: how the learning rate follows it (default linear)",
    )


def check_checkpoint_args(args: Any) -> dict[str, Any]:
    """Validate the flags; returns the trainer keyword arguments."""
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.keep_last is not None and args.keep_last < 1:
        raise UserError(f"--keep-last must be at least 1, got {args.keep_last}")
    if args.checkpoint_every and args.checkpoint_dir is None:
        raise UserError("--checkpoint-every needs --checkpoint-dir")
    if args.resume == AUTO and args.checkpoint_dir is None:
        raise UserError("--resume auto needs --checkpoint-dir (where to look for checkpoints)")
    if getattr(args, "start_over_if_corrupt", False) and args.resume != AUTO:
        raise UserError("--start-over-if-corrupt goes with --resume auto (it says what to do when no checkpoint loads)")
    return {
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": args.checkpoint_every,
        "keep_last": args.keep_last,
    }
