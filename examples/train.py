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
import os
import sys

from launcher import BatchPlan, UserError
from launcher.plan import PRECISIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="trainers.example:task", metavar="MODULE:FUNCTION")
    p.add_argument("--global-batch-size", type=int, metavar="G")
    p.add_argument("--micro-batch-size", type=int, metavar="M")
    p.add_argument("--gradient-accumulation-steps", type=int, metavar="K")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32, bf16 or fp16 (default: the plan's, else fp32)")
    p.add_argument(
        "--collective-timeout",
        type=float,
        metavar="SECONDS",
        help="a rank that stops answering this long ends the job, which names it (default 300)",
    )
    p.add_argument("--output", metavar="FILE", help="rank 0 writes the final model state_dict here")
    p.add_argument("--backend", choices=("ddp", "deepspeed"), default="ddp", help="DDPTrainer or DeepSpeedTrainer")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), help="deepspeed: ZeRO stage (default: JSON's, or 0)")
    p.add_argument(
        "--deepspeed-config",
        metavar="FILE",
        default=os.environ.get("GRADACCUM_DEEPSPEED_CONFIG"),
        help="deepspeed: your DeepSpeed JSON, merged under the plan (default $GRADACCUM_DEEPSPEED_CONFIG)",
    )
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    from trainers.resume import add_checkpoint_args

    add_checkpoint_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    from trainers import DDPTrainer, load_task
    from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, check_collective_timeout, init_distributed, shutdown
    from trainers.resume import (
        agree_on_checkpoint,
        check_checkpoint_args,
        checkpoint_plan,
        install_stop_handlers,
        plan_for_resume,
        save_final,
    )

    try:
        checkpoint_kwargs = check_checkpoint_args(args)
        timeout = check_collective_timeout(args.collective_timeout) or DEFAULT_COLLECTIVE_TIMEOUT_S
        plan = BatchPlan.from_env()
        resume_from = None
        if args.resume:
            init_distributed(collective_timeout=timeout)
            resume_from = agree_on_checkpoint(args.resume, args.checkpoint_dir)
        if plan is None:
            g, m, k = args.global_batch_size, args.micro_batch_size, args.gradient_accumulation_steps
            info = init_distributed(collective_timeout=timeout)
            if resume_from is not None:  # the checkpoint's global batch, re-solved for this world size
                plan = plan_for_resume(checkpoint_plan(resume_from), info.world_size, g, m, k)
            elif g is None and m is None:
                raise UserError("no plan: run under `gradaccum launch` or give --global-batch-size/--micro-batch-size")
            else:
                plan = BatchPlan.solve(g, m, k, world_size=info.world_size)
        trainer_class, extra = DDPTrainer, {}
        if args.backend == "deepspeed":
            from trainers import DeepSpeedTrainer

            trainer_class, extra = DeepSpeedTrainer, {"zero_stage": args.zero_stage, "ds_config": args.deepspeed_config}
        trainer = trainer_class.from_task(
            load_task(args.task),
            plan,
            precision=args.precision,
            collective_timeout=timeout,
            shuffle=not args.no_shuffle,
            count_collectives=True,  # prints the gradient all-reduce rounds per step (costs ~1% on small models)
            **checkpoint_kwargs,
            **extra,
        )
        if resume_from is not None:
            trainer.resume(resume_from, lr_scaling=args.lr_scaling)
        install_stop_handlers(trainer)  # SIGUSR1/SIGTERM: checkpoint after this step, stop
        rank0 = dist.get_rank() == 0

        def report(m):
            if rank0:
                print(
                    f"step {m.step} loss {m.loss:.6f} items {m.items} tokens {m.count:.0f} "
                    f"grad_norm {m.grad_norm if m.grad_norm is None else format(m.grad_norm, '.4f')} "
                    f"allreduce_rounds {m.allreduce_rounds}",
                    flush=True,
                )

        trainer.train(max(0, args.steps - trainer.global_step), callback=report)
        save_final(trainer)
        if trainer.stopped and rank0:
            print(
                f"train.py: stopped after step {trainer.global_step} on request; continue with --resume auto",
                file=sys.stderr,
                flush=True,
            )
        if rank0 and args.output and not trainer.stopped:
            from trainers.worker import save_atomic

            save_atomic(trainer.module.state_dict(), args.output)
        del trainer  # DDP's reducer holds the process group: let it go first
        shutdown(barrier=True)  # no rank tears down its connections while another still writes
        return 0
    except UserError as e:
        print(f"train.py (rank {os.environ.get('RANK', '0')}): error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    exit_worker(main())
