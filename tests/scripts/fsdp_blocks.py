"""A hand-written FSDP2 accumulation loop built from trainers.fsdp, on the built-in example LM.

    torchrun --nproc-per-node P tests/scripts/fsdp_blocks.py train --k K --steps S --output FILE.pt \
        [--checkpoint DIR] [--reduce mean|sum]
    torchrun --nproc-per-node P tests/scripts/fsdp_blocks.py load --checkpoint DIR --output FILE.pt

train: two runs from the same initial weights, one with gradient sync off on non-boundary
micro-steps (`micro_step_sync`), one with sync on every micro-step. Per optimizer step,
rank r takes micro-batches of M sequences from the global batch (padded per micro-batch by
the task's collate), the loss is the task's (loss_sum, count), scaled by world/N when FSDP
averages over ranks (--reduce mean, its default) or by 1/N when it sums (--reduce sum,
`fsdp.sum_gradients`); N = the step's global token count, all-reduced first; clipped at the
task's norm, AdamW. Rank 0 saves the full state after every step and the reduction rounds
and calls per step. With --checkpoint, the sync-off run then writes a DCP checkpoint to DIR
and its full params + Adam state to DIR.pt. load: a fresh sharded model and optimizer at
this world size load DIR; rank 0 saves the gathered params + Adam state to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist

from trainers import fsdp
from trainers.example import task as example_task

MICRO = 2


def build(model_factory, optimizer_factory, seed: int, reduce: str = "mean"):
    torch.manual_seed(seed)
    model = fsdp.shard(model_factory())
    if reduce == "sum":
        fsdp.sum_gradients(model)
    return model, fsdp.build_optimizer(model, optimizer_factory)


def train(args, rank: int, world: int) -> None:
    task = example_task()
    counter = fsdp.GradientReductionCounter().install()
    out: dict = {"world": world, "k": args.k, "micro": MICRO, "runs": {}}
    for mode in ("off", "on"):
        model, optimizer = build(task.model, task.optimizer, task.seed, args.reduce)
        states, rounds, calls = [fsdp.full_state_dict(model)], [], []
        g = MICRO * args.k * world
        for step in range(args.steps):
            items = task.dataset[step * g : (step + 1) * g]
            mine = items[rank * MICRO * args.k : (rank + 1) * MICRO * args.k]
            micro = [task.collate(mine[i * MICRO : (i + 1) * MICRO]) for i in range(args.k)]
            n = torch.tensor(float(sum(task.count(b) for b in micro)))
            dist.all_reduce(n)
            counter.reset()
            for k, batch in enumerate(micro):
                # sync off: the last micro-step as micro_step_sync sets it, the others in no_sync
                fsdp.micro_step_sync(model, boundary=True)
                off = mode == "off" and k < args.k - 1
                with fsdp.no_sync(model) if off else contextlib.nullcontext():
                    loss_sum, _ = task.loss(model, batch)
                    with counter.backward():
                        (loss_sum * ((world if args.reduce == "mean" else 1) / n)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rounds.append(counter.rounds)
            calls.append(dict(counter.calls))
            states.append(fsdp.full_state_dict(model))
        out["runs"][mode] = {"states": states, "rounds": rounds, "calls": calls}
        if mode == "off" and args.checkpoint:
            fsdp.save_sharded(args.checkpoint, model, optimizer)
            saved = {"params": fsdp.full_state_dict(model), "optim": fsdp.full_optimizer_state_dict(model, optimizer)}
            if rank == 0:
                torch.save(saved, args.checkpoint + ".pt")
    counter.uninstall()
    if rank == 0:
        torch.save(out, args.output)


def load(args, rank: int) -> None:
    task = example_task()
    model, optimizer = build(task.model, task.optimizer, task.seed + 1)  # other weights: the load must replace them
    fsdp.load_sharded(args.checkpoint, model, optimizer)
    loaded = {"params": fsdp.full_state_dict(model), "optim": fsdp.full_optimizer_state_dict(model, optimizer)}
    if rank == 0:
        torch.save(loaded, args.output)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "load"))
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--reduce", choices=("mean", "sum"), default="mean")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        train(args, rank, world) if args.mode == "train" else load(args, rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
