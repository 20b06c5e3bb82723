"""Train with the OOM fallback under torchrun; rank 1 'runs out of memory' above 2 items.

The OOM is simulated by the task's loss (a test hook raising torch.OutOfMemoryError at a
chosen micro-batch size, on one rank only), so the fallback's cross-rank agreement is
exercised: rank 0 never fails, yet must re-cut the same global batch with rank 1.
"""

import json
import sys

import torch
import torch.distributed as dist

from launcher import BatchPlan
from trainers import DDPTrainer
from trainers.example import make_task


def oom_task(limit: int):
    task = make_task("sum", with_count=True)
    inner = task.loss

    def loss(model, batch):
        if dist.is_initialized() and dist.get_rank() == 1 and batch[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"simulated: micro-batch of {batch[0].shape[0]} > {limit}")
        return inner(model, batch)

    task.loss = loss
    return task


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    plan = BatchPlan.solve(16, 8, world_size=2)
    trainer = DDPTrainer.from_task(oom_task(limit=2), plan, shuffle=False, count_collectives=True)
    trainer.enable_oom_fallback()
    history = list(trainer.iter_steps(steps))
    if dist.get_rank() == 0:
        torch.save(trainer.module.state_dict(), out + ".pt")
        summary = {
            "oom_events": trainer.oom_events,
            "plan": trainer.plan.to_dict(),
            "rounds": [m.allreduce_rounds for m in history],
            "losses": [m.loss for m in history],
        }
        with open(out + ".json", "w") as f:
            json.dump(summary, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    main()
    exit_worker(0)  # no teardown abort after the work is done
