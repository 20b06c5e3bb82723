"""Benchmark: DeepSpeedTrainer at ZeRO 3 vs a bare DeepSpeed engine loop on the same work.

Same model (the example LM), data, plan, config and threads; 2 processes, gloo. The bare
loop is what a careful user writes around a ZeRO-3 engine for a (loss_sum, count) loss: one
all-reduce of the step's token count, then per micro-step `engine.backward(loss_sum × dp / N,
scale_wrt_gas=False)` and `engine.step()` (DeepSpeed's micro-step counter decides when the
optimizer steps). Ours is `DeepSpeedTrainer.from_task(..., zero_stage=3).train(1)`, the public
API. The contenders take turns, one optimizer step each, in an order shuffled every round
(`dist_worker.Context.interleave`); each round's ratio is ours / bare on the same global batch.
An identical second trainer ("ours-copy", full runs) gives the A/A noise floor.
Target: ours <= 1.02x the bare loop's time per optimizer step.
"""

from __future__ import annotations

import gc
from typing import Any

from benchmarks.common import Target, paired_ratios, summary
from benchmarks.overhead import SAME_WEIGHTS_REL

NAME = "zero3"
TARGET = 1.02


def engine_config(task: Any, plan: Any) -> dict[str, Any]:
    """The config DeepSpeedTrainer renders for this task and plan (so both run the same engine)."""
    from launcher.configs import deepspeed_config

    return deepspeed_config(plan, zero_stage=3, gradient_clipping=task.clip_grad_norm, precision="fp32")


class Ours:
    name = "ours"
    drives_loop = False

    def __init__(self, task: Any, plan: Any) -> None:
        from trainers import DeepSpeedTrainer

        self.trainer = DeepSpeedTrainer.from_task(task, plan, zero_stage=3, shuffle=False, drop_last=True, log=False)
        self.module = self.trainer.module
        self.steps_done = 0

    def train_steps(self, n: int) -> None:
        if n:
            self.trainer.train(n)
            self.steps_done += n

    def describe(self) -> dict[str, Any]:
        return {"zero_stage": self.trainer.zero_stage}


class BareEngine:
    """The engine loop without the trainer: count all-reduce, scaled backward, step per micro-step."""

    name = "bare"
    drives_loop = False

    def __init__(self, task: Any, plan: Any, rank: int) -> None:
        import deepspeed
        import torch

        from benchmarks.contenders import DataFeed

        self.task, self.plan = task, plan
        torch.manual_seed(task.seed)
        model = task.model()
        optimizer = task.optimizer(model.parameters())
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=task.scheduler, config=engine_config(task, plan)
        )
        self.module = self.engine.module
        self.feed = DataFeed(task, plan, rank)
        self.steps_done = 0

    def train_steps(self, n: int) -> None:
        import torch
        import torch.distributed as dist

        task, engine, dp = self.task, self.engine, self.plan.data_parallel_size
        for _ in range(n):
            micro = self.feed.next_step()
            total = torch.tensor([float(sum(task.count(b) for b in micro))], dtype=torch.float64)
            dist.all_reduce(total)
            scale = dp / float(total[0])
            for batch in micro:
                loss_sum, _ = task.loss(engine, batch)
                engine.backward(loss_sum * scale, scale_wrt_gas=False)
                engine.step()  # off the boundary only DeepSpeed's micro-step counter moves
        self.steps_done += n

    def describe(self) -> dict[str, Any]:
        return {"zero_stage": 3}


def full_weights(module: Any) -> list[Any]:
    """Every parameter in full (a collective gather at ZeRO 3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in module.parameters()]


def weight_diff(a: list[Any], b: list[Any]) -> dict[str, float]:
    diffs = [float((p - q).abs().max()) for p, q in zip(a, b, strict=True)]
    scale = max(float(q.abs().max()) for q in b)
    return {"max_abs_diff": max(diffs), "max_rel_diff": max(diffs) / scale if scale else float("inf")}


def worker_job(cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Rank side: ours, the bare loop (and ours-copy), interleaved; then their weights compared."""
    from benchmarks.workloads import build_task, plan_for

    task = build_task(cfg["workload"], ctx.quick)
    plan = plan_for(cfg["micro"], cfg["k"], ctx.world)
    contenders: dict[str, Any] = {"ours": Ours(task, plan), "bare": BareEngine(task, plan, ctx.rank)}
    if cfg.get("aa"):
        copy = Ours(task, plan)
        copy.name = "ours-copy"
        contenders["ours-copy"] = copy
    ms = ctx.interleave(contenders, cfg["warmup"], cfg["steps"])
    weights = {name: full_weights(c.module) for name, c in contenders.items()}
    out = {
        "task": task.name,
        # ds_numel: the full size (the module's own parameters are empty partitions at ZeRO 3)
        "parameters": sum(int(p.ds_numel) for p in contenders["ours"].module.parameters()),
        "plan": plan.to_dict(),
        "rounds": cfg["steps"],
        "warmup": cfg["warmup"],
        "ms_per_step": ms,
        "weights_vs_ours": {n: weight_diff(w, weights["ours"]) for n, w in weights.items() if n != "ours"},
        "steps_done": {name: c.steps_done for name, c in contenders.items()},
    }
    for c in contenders.values():
        engine = getattr(c, "engine", None) or getattr(getattr(c, "trainer", None), "engine", None)
        if engine is not None:
            engine.destroy()
    contenders.clear()
    gc.collect()
    return out


def summarize(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    ms = raw["ms_per_step"]
    result: dict[str, Any] = {
        "task": raw["task"],
        "parameters": raw["parameters"],
        "plan": raw["plan"],
        "rounds": raw["rounds"],
        "ratio": paired_ratios(ms["ours"], ms["bare"]),
        "ms_ours": summary(ms["ours"]),
        "ms_bare": summary(ms["bare"]),
        "weights": raw["weights_vs_ours"]["bare"],
    }
    if "ours-copy" in ms:
        result["noise_floor"] = paired_ratios(ms["ours"], ms["ours-copy"])
    targets = [
        Target(
            "zero3: DeepSpeedTrainer / bare engine loop",
            result["ratio"]["median"],
            TARGET,
            "<=",
            "ZeRO 3, time per optimizer step, median of the per-round ratios",
        ),
        Target(
            "zero3: same weights as the bare engine loop",
            result["weights"]["max_rel_diff"],
            SAME_WEIGHTS_REL,
            "<=",
            "max |w_ours - w_bare| / max |w| after the timed steps (round-off only)",
        ),
    ]
    return result, targets
