"""Train with DDPTrainer (or DeepSpeedTrainer) under any launcher: torchrun, `gradaccum launch`, mpirun, deepspeed, srun.

    torchrun --nproc-per-node 2 examples/train.py --global-batch-size 24 --micro-batch-size 4 --steps 20
    gradaccum launch --launcher mpirun --nproc-per-node 2 --global-batch-size 24 \\
        --micro-batch-size 4 -- examples/train.py --steps 20
    python examples/train.py --global-batch-size 8 --micro-batch-size 2      # one process
    gradaccum launch --launcher deepspeed --zero-stage 2 --nproc-per-node 2 --global-batch-size 24 \\
        --micro-batch-size 4 -- examples/train.py --backend deepspeed --steps 20   # DeepSpeedTrainer
    torchrun --nproc-per-node 2 examples/train.py --global-batch-size 24 --micro-batch-size 4 \\
        --steps 20 --checkpoint-dir ckpt --checkpoint-every 5 --resume auto   # restartable, any world size

The batch plan comes from $GRADACCUM_PLAN when a gradaccum launcher set it, else from the
flags with the live world size. Rank 0 prints one line per optimizer step and, with
--output FILE, saves the final model state_dict (the task model's own keys). --steps is the
total: a resumed run trains the steps left. SIGUSR1 or SIGTERM on any rank: every rank stops
after the same step, writes a checkpoint (with --checkpoint-dir) and exits 0.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from trainers.startup import add_worker_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_worker_args(p, steps_default=10)
    p.add_argument("--output", metavar="FILE", help="rank 0 writes the final model state_dict here")
    return p.parse_args(argv)


def train(session) -> None:
    """Print one line per step on rank 0; --output: the final model."""
    trainer, rank0 = session.trainer, session.rank0

    def report(m):
        if rank0:
            print(
                f"step {m.step} loss {m.loss:.6f} items {m.items} tokens {m.count:.0f} "
                f"grad_norm {m.grad_norm if m.grad_norm is None else format(m.grad_norm, '.4f')} "
                f"allreduce_rounds {m.allreduce_rounds}",
                flush=True,
            )

    trainer.train(session.steps_left, callback=report)
    if trainer.stopped and rank0:
        print(
            f"train.py: stopped after step {trainer.global_step} on request; continue with --resume auto",
            file=sys.stderr,
            flush=True,
        )
    if session.args.output and not trainer.stopped:
        from trainers.startup import save_atomic
        from trainers.worker import full_state_dict

        state = full_state_dict(trainer)  # every rank: a gather when the model is sharded (ZeRO 3)
        if rank0:
            save_atomic(state, session.args.output)


def main(argv: list[str] | None = None) -> int:
    from trainers.startup import run_worker

    return run_worker(parse_args(argv), train, prog="train.py")


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    exit_worker(main())
