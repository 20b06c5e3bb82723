"""Pre-emptible training for the Slurm tests: DDPTrainer on the built-in example, real checkpoints.

    slurm_train.py --steps S --output FILE --checkpoint-dir DIR [--step-delay SECONDS]

Plan from $GRADACCUM_PLAN, ranks from the launcher (srun tasks or torchrun). On USR1 or
TERM every rank finishes the current optimizer step; the ranks agree on stopping with one
all-reduce per step (a signal can land on either side of a step boundary on different
ranks), save a checkpoint (trainers.checkpoint), and rank 0 writes `preempted-<restart>`
into the checkpoint directory and runs `scontrol requeue` (launcher.slurm). A run that
finds a checkpoint resumes from it. Rank 0 writes the final model state_dict to FILE and
`restart-count` (SLURM_RESTART_COUNT of the run that finished).

This is the Slurm side of pre-emption driven from a script; the trainers' own
checkpoint/resume flags replace the loop below once they exist.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (a longer run)")
    args = p.parse_args()

    stop = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))

    import torch
    import torch.distributed as dist

    from launcher import BatchPlan
    from launcher.slurm import requeue_current_job
    from trainers import DDPTrainer, load_task
    from trainers.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from trainers.distributed import init_distributed, shutdown

    plan = BatchPlan.from_env()
    info = init_distributed(plan)
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    trainer = DDPTrainer.from_task(load_task("trainers.example:task"), plan, shuffle=True)
    ckpt_root = Path(args.checkpoint_dir)
    found = latest_checkpoint(ckpt_root)
    if found is not None:
        state, rank_state, _ = load_checkpoint(found, rank=rank)
        trainer.load_state_dict(state)
        if rank_state is not None:
            set_rng_state(rank_state)
        if rank == 0:
            print(f"resumed from {found.name} at step {trainer.global_step} (restart {restart})", flush=True)

    while trainer.global_step < args.steps:
        (m,) = trainer.train(1)
        if rank == 0:
            print(f"step {m.step} loss {m.loss:.6f} ({info.launcher}, world {world}, restart {restart})", flush=True)
        time.sleep(args.step_delay)
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and trainer.global_step < args.steps:
            path = save_checkpoint(
                ckpt_root,
                trainer.global_step,
                trainer.state_dict() if rank == 0 else None,
                rank=rank,
                world_size=world,
                plan=plan,
                rank_state=rng_state(),
                barrier=dist.barrier,
            )
            if rank == 0:
                (ckpt_root / f"preempted-{restart}").write_text(f"{path.name}\n")
                print(f"pre-empted: checkpoint {path.name}; requeueing", flush=True)
                if not requeue_current_job():
                    print("not under Slurm: exiting after the checkpoint", flush=True)
                    return 3
            # Slurm ends every process of the job (TERM, then KILL) once the requeue is accepted.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(120)
            print(f"rank {rank}: the job was not requeued within 120 s", file=sys.stderr, flush=True)
            return 4

    if rank == 0:
        from trainers.worker import save_atomic

        save_atomic(trainer.module.state_dict(), args.output)
        Path(args.output).with_name("restart-count").write_text(f"{restart}\n")
    shutdown(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
