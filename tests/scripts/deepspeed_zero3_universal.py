"""Prototype (not wired into the trainer): DeepSpeed ZeRO-3 accumulation, and universal checkpoints.

    torchrun --nproc-per-node 2 tests/scripts/deepspeed_zero3_universal.py zero3 --k K --steps S --output F.pt
    torchrun --nproc-per-node 2 tests/scripts/deepspeed_zero3_universal.py save --dir DIR --output F.pt
    python -m deepspeed.checkpoint.ds_to_universal --input_folder DIR/TAG --output_folder DIR/TAG_universal
    torchrun --nproc-per-node 1 tests/scripts/deepspeed_zero3_universal.py load --dir DIR --output F.pt

zero3: the example LM (AdamW passed in as a torch optimizer, clipping 1.0) under ZeRO stage 3,
two cases from the same weights. "count": each micro-step's loss_sum is scaled by dp/N before
`engine.backward(loss, scale_wrt_gas=False)` (N = the step's global token count). "nocount":
backward on the plain loss_sum, then, after the boundary backward and before `engine.step()`,
the reduced gradient partitions are multiplied by dp/N where ZeRO-3 keeps them:
`engine.optimizer.averaged_gradients[sub_group]` (views of the fp32 partition buffer that
the reduce-scatter of every micro-step accumulates into; no `_hp_mapping` at stage 3).
Full fp32 parameters come from `deepspeed.utils.safe_get_full_fp32_param` (the module's own
parameters are empty partitions at stage 3). Rank 0 saves states per step per case.

save: ZeRO-2 at 2 processes trains 2 steps, `engine.save_checkpoint(DIR, TAG,
client_state={"universal_checkpoint_info": {}})`, and rank 0 saves full params and full Adam
state (`safe_get_full_optimizer_state`) to F. load: 1 process, `"checkpoint": {"load_universal":
true}`, `engine.load_checkpoint(DIR, TAG_universal)` ... the same gathered state to F.
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from trainers.example import task as example_task

MICRO, TAG = 2, "step2"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def config(stage: int, k: int, world: int, **extra) -> dict:
    return {
        "train_batch_size": MICRO * k * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": k,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        **extra,
    }


def engine_for(stage: int, k: int, world: int, **extra):
    task = example_task()
    torch.manual_seed(task.seed)
    model = task.model()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=task.optimizer(model.parameters()), config=config(stage, k, world, **extra)
    )
    return task, engine


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 value (collective at ZeRO 3: gathers the partitions)."""
    return {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in engine.module.named_parameters()}


def full_adam(engine) -> dict[str, dict[str, torch.Tensor]]:
    state = {}
    for name, p in engine.module.named_parameters():
        state[name] = {key: safe_get_full_optimizer_state(p, key).detach().cpu().clone() for key in ADAM_KEYS}
    # the torch optimizer's per-group step (one count for the flat partition DeepSpeed steps)
    state["__step__"] = {"step": torch.tensor([float(s["step"]) for s in engine.optimizer.optimizer.state.values()])}
    return state


def scale_zero3_gradients(engine, factor: float) -> None:
    """dp/N on the reduced fp32 gradient partitions ZeRO-3 steps from (no offload)."""
    grads = [g for group in engine.optimizer.averaged_gradients.values() for g in group]
    torch._foreach_mul_(grads, factor)


def train_steps(task, engine, k: int, steps: int, rank: int, world: int, mode: str) -> list[dict]:
    states = [full_params(engine)]
    g = MICRO * k * world
    for step in range(steps):
        mine = task.dataset[step * g : (step + 1) * g][rank * MICRO * k : (rank + 1) * MICRO * k]
        micro = [task.collate(mine[i * MICRO : (i + 1) * MICRO]) for i in range(k)]
        n = torch.tensor(float(sum(task.count(b) for b in micro)))
        dist.all_reduce(n)
        for batch in micro:
            loss_sum, _ = task.loss(engine, batch)
            engine.backward(loss_sum * (world / n) if mode == "count" else loss_sum, scale_wrt_gas=False)
            if not engine.is_gradient_accumulation_boundary():
                engine.step()  # off the boundary: only advances DeepSpeed's micro-step counter
        assert engine.is_gradient_accumulation_boundary()
        if mode == "nocount":
            scale_zero3_gradients(engine, world / float(n))
        engine.step()
        states.append(full_params(engine))
    return states


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("zero3", "save", "load"))
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dir")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"world": world, "k": args.k, "micro": MICRO}
    if args.mode == "zero3":
        for mode in ("count", "nocount"):
            task, engine = engine_for(3, args.k, world)
            out[mode] = train_steps(task, engine, args.k, args.steps, rank, world, mode)
            engine.destroy()
    elif args.mode == "save":
        task, engine = engine_for(2, args.k, world)
        train_steps(task, engine, args.k, args.steps, rank, world, "count")
        engine.save_checkpoint(args.dir, TAG, client_state={"universal_checkpoint_info": {}})
        out.update(params=full_params(engine), adam=full_adam(engine), global_steps=engine.global_steps)
    else:
        task, engine = engine_for(2, args.k, world, checkpoint={"load_universal": True})
        path, _ = engine.load_checkpoint(args.dir, f"{TAG}_universal")
        assert path is not None, "load_checkpoint found nothing"
        out.update(params=full_params(engine), adam=full_adam(engine), global_steps=engine.global_steps)
    if rank == 0:
        torch.save(out, args.output)
    dist.barrier()


if __name__ == "__main__":
    main()
