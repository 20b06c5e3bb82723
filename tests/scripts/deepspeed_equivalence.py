"""DeepSpeedTrainer on several cases in the same processes (one DeepSpeed start-up for all).

    torchrun --nproc-per-node 2 tests/scripts/deepspeed_equivalence.py \
        --case 0:trainers.example:mlp_task:4 [--case STAGE:TASK:K[:M] ...] --steps 3 --output FILE.pt

A case is STAGE:TASK:K[:M[:PRECISION[:OPTION]]]: the ZeRO stage, the task (MODULE:FUNCTION),
K accumulation steps, micro-batch size M (default 2), precision (default fp32), and OPTION
`offload` (ZeRO-Offload of the optimizer to the CPU), `resume` (checkpoint after step 1,
resume in a fresh engine) or `partial` (the dataset cut to `partial_length`: the last step's
window is partial, some micro-steps empty); each case gets its own engine. The
states saved are the fp32 master weights (`fp32_state_dict`); a UserError raised while
training (the same on every rank) is saved as the case's `error`. Every
rank trains each case with collective counting, without shuffling; rank 0 saves, per case,
the plan, the model state_dict before the first step and after every optimizer step, and
each step's metrics (gradient communication rounds and calls included). The test computes
the single-device reference itself and compares.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch.distributed as dist

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.deepspeed_trainer import DeepSpeedTrainer
from trainers.distributed import init_distributed, shutdown
from trainers.startup import save_atomic
from trainers.task import load_task


def partial_length(plan: BatchPlan, steps: int) -> int:
    """A dataset length whose last of `steps` global batches holds a bit over half a batch."""
    return (steps - 1) * plan.global_batch_size + plan.global_batch_size // 2 + 1


def run_case(spec: str, steps: int, world: int, checkpoints: Path) -> dict:
    parts = spec.split(":")
    stage, task_name, k = int(parts[0]), ":".join(parts[1:3]), int(parts[3])
    micro = int(parts[4]) if len(parts) > 4 else 2
    precision = parts[5] if len(parts) > 5 else "fp32"
    option = parts[6] if len(parts) > 6 else None
    ds_config = None
    if option == "offload":  # keep the task's torch optimizer: DeepSpeed would swap in its compiled CPU Adam
        ds_config = {
            "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
            "zero_force_ds_cpu_optimizer": False,
        }
    plan = BatchPlan.solve(micro_batch_size=micro, gradient_accumulation_steps=k, world_size=world)
    dataset_length = partial_length(plan, steps) if option == "partial" else None

    def build() -> DeepSpeedTrainer:
        task = load_task(task_name)
        if dataset_length is not None:
            task = dataclasses.replace(task, dataset=task.dataset[:dataset_length])
        return DeepSpeedTrainer.from_task(
            task,
            plan,
            zero_stage=stage,
            ds_config=ds_config,
            precision=precision,
            shuffle=False,
            count_collectives=True,
            log=False,
        )

    trainer = build()
    # every rank calls it: at ZeRO 1/2 in 16 bits it gathers the partitions
    states, metrics, error = [trainer.fp32_state_dict()], [], None
    try:
        for step in range(1, steps + 1):
            m = trainer.train(1)
            states.append(trainer.fp32_state_dict())
            metrics.append({**m.to_dict(), "calls": dict(trainer.last_collective_calls)})
            if option == "resume" and step == 1:
                # checkpoint through DeepSpeed's own files, then a fresh engine resumes from it
                trainer.save(checkpoints / spec.replace(":", "_"))
                trainer.close()
                trainer = build()
                trainer.resume(checkpoints / spec.replace(":", "_"))
    except UserError as e:
        error = str(e)
    finally:
        trainer.close()
    return {
        "case": spec,
        "zero_stage": stage,
        "precision": precision,
        "task": task_name,
        "plan": plan.to_dict(),
        "dataset_length": dataset_length,
        "states": states,
        "metrics": metrics,
        "error": error,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--case", action="append", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    info = init_distributed()
    checkpoints = Path(args.output).parent / "checkpoints"
    results = [run_case(spec, args.steps, info.world_size, checkpoints) for spec in args.case]
    if dist.get_rank() == 0:
        save_atomic({case["case"]: case for case in results}, args.output)
    shutdown(barrier=True)
    return 0


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    exit_worker(main())  # no teardown abort after the work is done
