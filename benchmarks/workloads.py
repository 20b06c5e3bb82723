"""The models, data and plans every contender trains: one definition, used by all of them.

- `mlp`: a ~5M-parameter MLP (256 -> 2048 -> 2048 -> 256), MSE mean loss, Adam, micro 4, K 4
  (the figures in issue 9 were measured on this shape).
- `lm`: the built-in example LM (`trainers.example.task()`: variable-length sequences, token
  loss as (sum, count) with Task.count, AdamW, warm-up schedule, clipping).
- `lm-mean`: the same LM with a per-micro-batch token mean divided by K, the loss that
  Accelerate and Lightning users write; every contender then computes the same update, so
  the peers can be timed on the LM too.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from launcher.plan import BatchPlan
from trainers.task import Task


def make_mlp(width: int = 2048, io: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(io, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, io))


def regression_data(n: int, io: int, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, io, generator=g)
    y = torch.tanh(x.roll(1, dims=1)) + 0.1 * torch.randn(n, io, generator=g)
    return list(zip(x, y, strict=True))


def mse_mean(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def mlp_task(width: int = 2048, io: int = 256, items: int = 512) -> Task:
    return Task(
        partial(make_mlp, width, io),
        regression_data(items, io),
        mse_mean,
        partial(torch.optim.Adam, lr=1e-4),
        name=f"MLP {io}-{width}-{width}-{io}",
    )


def lm_task() -> Task:
    from trainers.example import task

    return task()


def lm_mean_task() -> Task:
    from trainers.example import make_task

    return make_task("mean", with_count=False)


TASKS = {"mlp": mlp_task, "lm": lm_task, "lm-mean": lm_mean_task}
#: workloads whose loss is a scalar mean divided by K: the loss Accelerate and Lightning scale
PEER_WORKLOADS = ("mlp", "lm-mean")


def build_task(name: str, quick: bool = False) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(TASKS)}")
    if name == "mlp" and quick:
        return mlp_task(width=256, io=64, items=256)
    return TASKS[name]()


def plan_for(micro: int, accumulation: int, world: int) -> BatchPlan:
    return BatchPlan.solve(micro * accumulation * world, micro, accumulation, world_size=world)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def max_weight_diff(a: nn.Module, b: nn.Module) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) over all parameters."""
    diffs = [float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)]
    scale = max(float(q.detach().abs().max()) for q in b.parameters())
    return max(diffs), max(diffs) / scale if scale else float("inf")
