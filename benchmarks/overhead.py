"""Benchmark 1, trainer overhead: DDPTrainer vs a hand-written nanoGPT-style loop.

Same model, data, plan and threads; 2 processes, gloo, accumulation 4; the ~5M-parameter
MLP and the example LM. Both contenders (and, for `peers`, Accelerate and Lightning) live
in the same processes and take turns, one optimizer step each, in an order shuffled every
round; the ratio of each round is ours / theirs on the same global batch, back to back.
Target: ours <= 1.02x the hand loop's time per optimizer step.
"""

from __future__ import annotations

import gc
from typing import Any

from benchmarks.common import Target, paired_ratios, summary

NAME = "overhead"
TARGET = 1.02
#: weights may differ by round-off only: relative to the largest weight
SAME_WEIGHTS_REL = 1e-5


def worker_job(cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Rank side: every workload's contenders, interleaved; then their weights compared with ours."""
    from benchmarks.contenders import make_contender
    from benchmarks.workloads import build_task, max_weight_diff, parameter_count, plan_for

    out: dict[str, Any] = {}
    for workload, spec in cfg["workloads"].items():
        task = build_task(workload, ctx.quick)
        plan = plan_for(spec["micro"], spec["k"], ctx.world)
        contenders = {name: make_contender(name, task, plan, ctx.rank) for name in spec["contenders"]}
        ms = ctx.interleave(contenders, cfg["warmup"], spec["steps"])
        ours = contenders["ours"].module
        weights = {}
        for name, c in contenders.items():
            if name != "ours":
                abs_diff, rel_diff = max_weight_diff(c.module, ours)
                weights[name] = {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff}
        out[workload] = {
            "task": task.name,
            "parameters": parameter_count(ours),
            "plan": plan.to_dict(),
            "rounds": spec["steps"],
            "ms_per_step": ms,
            "weights_vs_ours": weights,
            "steps_done": {name: c.steps_done for name, c in contenders.items()},
            "contenders": {name: c.describe() for name, c in contenders.items()},
        }
        del contenders, ours
        gc.collect()
    out["warmup"] = cfg["warmup"]
    return out


def pool_launches(launches: list[dict[str, Any]]) -> dict[str, Any]:
    """One training job's figures from several launches: the rounds of all, in launch order
    (each round stays paired), the largest weight difference, the per-launch medians kept."""
    pooled = dict(launches[0])
    pooled["launches"] = len(launches)
    pooled["wall_s"] = sum(launch.get("wall_s", 0.0) for launch in launches)
    for workload, first in launches[0].items():
        if not isinstance(first, dict) or "ms_per_step" not in first:
            continue
        parts = [launch[workload] for launch in launches]
        w = dict(first)
        w["rounds"] = sum(p["rounds"] for p in parts)
        w["ms_per_step"] = {name: [ms for p in parts for ms in p["ms_per_step"][name]] for name in first["ms_per_step"]}
        w["steps_done"] = {name: sum(p["steps_done"][name] for p in parts) for name in first["steps_done"]}
        w["weights_vs_ours"] = {
            name: {key: max(p["weights_vs_ours"][name][key] for p in parts) for key in diffs}
            for name, diffs in first["weights_vs_ours"].items()
        }
        w["launch_medians_vs_ours"] = {
            name: [paired_ratios(p["ms_per_step"]["ours"], p["ms_per_step"][name])["median"] for p in parts]
            for name in first["ms_per_step"]
            if name != "ours"
        }
        pooled[workload] = w
    return pooled


def compare(raw_workload: dict[str, Any], other: str) -> dict[str, Any]:
    ms = raw_workload["ms_per_step"]
    return {
        "ratio": paired_ratios(ms["ours"], ms[other]),
        "ms_ours": summary(ms["ours"]),
        f"ms_{other}": summary(ms[other]),
        "weights": raw_workload["weights_vs_ours"][other],
        "launch_medians": raw_workload.get("launch_medians_vs_ours", {}).get(other),
    }


def weights_target(workload: str, other: str, weights: dict[str, float]) -> Target:
    return Target(
        f"{workload}: same weights as {other}",
        weights["max_rel_diff"],
        SAME_WEIGHTS_REL,
        "<=",
        f"max |w_ours - w_{other}| / max |w| after every timed step (round-off only)",
    )


def summarize(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    result: dict[str, Any] = {"workloads": {}}
    targets = []
    for workload in ("mlp", "lm"):
        if workload not in raw or "hand" not in raw[workload]["ms_per_step"]:
            continue
        w = raw[workload]
        entry = {"task": w["task"], "parameters": w["parameters"], "plan": w["plan"], "rounds": w["rounds"]}
        entry.update(compare(w, "hand"))
        if "ours-copy" in w["ms_per_step"]:
            # A/A: ours against an identical copy of itself, measured the same way. Its spread
            # is the resolution of this run: smaller differences are noise.
            entry["noise_floor"] = paired_ratios(w["ms_per_step"]["ours"], w["ms_per_step"]["ours-copy"])
            entry["noise_floor"]["launch_medians"] = w.get("launch_medians_vs_ours", {}).get("ours-copy")
        if "ours-ddp-defaults" in w["ms_per_step"]:
            # ours with PyTorch's DDP defaults (no gradient_as_bucket_view) against the hand loop:
            # the trainer's own overhead, without what its DDP settings win
            entry["ddp_defaults_vs_hand"] = paired_ratios(
                w["ms_per_step"]["ours-ddp-defaults"], w["ms_per_step"]["hand"]
            )
        result["workloads"][workload] = entry
        targets.append(
            Target(
                f"{workload}: ours / hand loop",
                entry["ratio"]["median"],
                TARGET,
                "<=",
                "time per optimizer step, median of the per-round ratios",
            )
        )
        targets.append(weights_target(workload, "hand", entry["weights"]))
    result["warmup"] = raw["warmup"]
    return result, targets
