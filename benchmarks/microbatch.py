"""Issue 10's benchmark: time per optimizer step at a fixed global batch across micro-batch sizes.

The example LM, 2 processes, global batch fixed; every micro-batch size that divides the
per-rank share gets its own DDPTrainer, and they take turns, one timed optimizer step each. Then
`trainers.autobatch.auto_micro_batch` (what `--micro-batch-size auto` runs) measures the
model and picks a size for the default memory budget; its sizes' fit says which fit.
Target: the size auto picks is within 10% of the fastest size that fits (paired ratio
against the size with the lowest median).
"""

from __future__ import annotations

import gc
from typing import Any

from benchmarks.common import Target, paired_ratios, summary

NAME = "microbatch"
TARGET = 1.10
TASK_SPEC = "trainers.example:task"


def sizes_for(global_batch: int, world: int, wanted: list[int]) -> list[int]:
    share = global_batch // world
    return [m for m in wanted if share % m == 0]


def worker_job(cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from benchmarks.contenders import Ours
    from benchmarks.workloads import build_task
    from launcher.plan import BatchPlan

    task = build_task("lm")
    sizes = sizes_for(cfg["global_batch"], ctx.world, cfg["sizes"])
    contenders = {}
    for m in sizes:
        plan = BatchPlan.solve(cfg["global_batch"], m, world_size=ctx.world)
        contenders[f"micro {m}"] = Ours(task, plan)
    ms = ctx.interleave(contenders, cfg["warmup"], cfg["steps"])
    out = {
        "task": task.name,
        "global_batch": cfg["global_batch"],
        "sizes": sizes,
        "ms_per_step": {str(m): ms[f"micro {m}"] for m in sizes},
        "warmup": cfg["warmup"],
        "steps": cfg["steps"],
    }
    del contenders
    gc.collect()
    return out


def auto_choice(global_batch: int, world: int, trial_sizes: tuple[int, ...] | None) -> dict[str, Any]:
    """Where `--micro-batch-size auto` lands, and which sizes its memory fit says fit."""
    from launcher.memory import micro_options
    from trainers.autobatch import auto_micro_batch

    # Two ranks share this machine's memory, as they would under `gradaccum launch`.
    auto = auto_micro_batch(TASK_SPEC, global_batch, world, sizes=trial_sizes, processes_per_device=world)
    options = micro_options(auto.plan, None, auto.model, auto.budget_bytes)
    return {
        "micro_batch_size": auto.plan.micro_batch_size,
        "budget_bytes": auto.budget_bytes,
        "fit": {"base_bytes": auto.model.base_bytes, "per_sample_bytes": auto.model.per_sample_bytes},
        "measured_points": [list(p) for p in auto.model.points],
        "fits": {str(o.micro_batch_size): o.fits for o in options},
    }


def summarize(raw: dict[str, Any], auto: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    ms = raw["ms_per_step"]
    per_size = {m: summary(v) for m, v in ms.items()}
    fitting = [m for m in ms if auto["fits"].get(m, False)]
    result: dict[str, Any] = {
        "task": raw["task"],
        "global_batch": raw["global_batch"],
        "ms_per_step": per_size,
        "auto": auto,
        "warmup": raw["warmup"],
        "steps": raw["steps"],
    }
    chosen = str(auto["micro_batch_size"])
    if not fitting or chosen not in ms:
        why = "no timed size fits" if not fitting else f"auto picked micro {chosen}, which was not timed"
        result["error"] = why
        return result, [Target("microbatch: auto / fastest size that fits", None, TARGET, "<=", why)]
    fastest = min(fitting, key=lambda m: per_size[m]["median"])
    result["fastest_fitting"] = int(fastest)
    result["auto_over_fastest"] = paired_ratios(ms[chosen], ms[fastest])
    target = Target(
        "microbatch: auto / fastest size that fits",
        result["auto_over_fastest"]["median"],
        TARGET,
        "<=",
        f"time per step of micro {chosen} (auto) over micro {fastest} (fastest median), paired",
    )
    return result, [target]
