"""Two single-process benchmarks of the real-workload features (issue 17), paired rounds.

  metrics_log  the example LM's optimizer step with a MetricsLogger (metrics.csv, TensorBoard
               when installed, a tqdm bar drawn to /dev/null) vs the same trainer without
               one. Target: with / without <= 1.01.
  hf_step      the tiny Hugging Face GPT-2 of trainers.hf_example: the Trainer's step
               (accumulation K, exact token mean by Task.count) vs a hand-written
               accumulation loop on the same model (collate, sum loss / global token count,
               backward per micro-batch, one AdamW step). Target: ours / hand <= 1.02; the
               weights must agree to round-off.

Each round takes one optimizer step per contender, in an order shuffled every round; the
figure is the median of the per-round ratios (benchmarks.common.paired_ratios).
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import Target, paired_ratios, shuffled

METRICS_TARGET = 1.01
HF_TARGET = 1.02
SAME_WEIGHTS_REL = 1e-5


def _rounds(contenders: dict[str, Any], warmup: int, steps: int, seed: int = 0) -> dict[str, list[float]]:
    """contenders: name -> a function taking one optimizer step. Seconds per step, per round."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(warmup + steps):
        for name in shuffled(list(contenders), rng):
            t0 = time.perf_counter()
            contenders[name]()
            took = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(took)
    return times


# ------------------------------------------------------------------ logging overhead
def run_metrics_log(cfg: dict[str, Any]) -> dict[str, Any]:
    from trainers.example import task
    from trainers.metrics_log import MetricsLogger
    from trainers.reference import ReferenceTrainer

    torch.set_num_threads(1)
    total = cfg["warmup"] + cfg["steps"]
    with tempfile.TemporaryDirectory(prefix="gradaccum-bench-log-") as tmp, open(os.devnull, "w") as devnull:
        logger = MetricsLogger(tmp, progress=True, rank0=True, progress_file=devnull)
        with (
            ReferenceTrainer.from_task(task(), cfg["global_batch"], components=[logger]) as logged,
            ReferenceTrainer.from_task(task(), cfg["global_batch"], progress=False) as plain,
        ):
            # one train call each (iter_steps), stepped in turns: the bar and the file stay open
            runs = {"with": logged.iter_steps(total), "without": plain.iter_steps(total)}
            times = _rounds({name: (lambda it=it: next(it)) for name, it in runs.items()}, cfg["warmup"], cfg["steps"])
            for it in runs.values():
                it.close()
            rows = sum(1 for _ in open(os.path.join(tmp, "metrics.csv"))) - 1
            # the hooks alone, timed directly: a second view, free of the step's noise
            metrics = next(plain.iter_steps(1))
            scratch = MetricsLogger(os.path.join(tmp, "scratch"), progress=True, rank0=True, progress_file=devnull)
            scratch.on_train_start(plain, 200)
            t0 = time.perf_counter()
            for _ in range(200):
                scratch.log_step(metrics, 0.1)
            hook_s = (time.perf_counter() - t0) / 200
            scratch.close()
    return {"times_s": times, "hook_s": hook_s, "rows_written": rows, "tensorboard": logger.tensorboard, "config": cfg}


def summarize_metrics_log(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    ratio = paired_ratios(raw["times_s"]["with"], raw["times_s"]["without"])
    step_s = statistics.median(raw["times_s"]["without"])
    result = {**raw, "with_over_without": ratio, "hook_fraction_of_step": raw["hook_s"] / step_s}
    return result, [
        Target(
            "metrics_log: step with metrics.csv + bar / without",
            ratio["median"],
            METRICS_TARGET,
            "<=",
            "the example LM, one process",
            note=f"TensorBoard {'on' if raw['tensorboard'] else 'off (not installed)'}; the hooks alone: "
            f"{raw['hook_s'] * 1e3:.2f} ms = {result['hook_fraction_of_step']:.2%} of a step",
        )
    ]


# ------------------------------------------------------------------ the HF example
def _hand_loop(task: Any, plan: Any) -> tuple[torch.nn.Module, Any]:
    """The hand-written accumulation loop on the task's model: returns (model, step function)."""
    from trainers.sampler import GlobalBatchSampler

    torch.manual_seed(task.seed)
    model = task.model()
    opt = task.optimizer(model.parameters())
    sampler = GlobalBatchSampler(len(task.dataset), plan, 0, seed=task.seed)

    def step() -> None:
        micro = [task.collate([task.dataset[i] for i in ix]) for ix in sampler.next_step()]
        tokens = sum(task.count(b) for b in micro)  # the global token count: an exact mean
        for b in micro:
            loss_sum, _ = task.loss(model, b)
            (loss_sum / tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def run_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    from launcher.plan import BatchPlan
    from trainers.hf_example import gpt2_task
    from trainers.strategies.single import SingleDeviceStrategy
    from trainers.trainer import CommonOptions, Trainer, build_from_task

    torch.set_num_threads(1)
    task = gpt2_task()
    task.scheduler, task.clip_grad_norm = None, None  # the hand loop has neither
    plan = BatchPlan(cfg["micro"] * cfg["k"], cfg["micro"], cfg["k"], 1)
    model, optimizer, fields = build_from_task(task, torch.device("cpu"))
    ours = Trainer(SingleDeviceStrategy("cpu"), model, optimizer, plan, task.loss, CommonOptions(**fields), log=False)
    hand_model, hand_step = _hand_loop(task, plan)
    steps = iter(ours.iter_steps(cfg["warmup"] + cfg["steps"]))
    times = _rounds({"ours": lambda: next(steps), "hand": hand_step}, cfg["warmup"], cfg["steps"])
    steps.close()
    ours.close()
    diff = max(
        float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
        for a, b in zip(ours.module.state_dict().values(), hand_model.state_dict().values(), strict=True)
    )
    return {"times_s": times, "max_rel_weight_diff": diff, "plan": plan.to_dict(), "config": cfg}


def summarize_hf(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    ratio = paired_ratios(raw["times_s"]["ours"], raw["times_s"]["hand"])
    result = {**raw, "ours_over_hand": ratio}
    return result, [
        Target("hf_step: Trainer step / hand accumulation loop", ratio["median"], HF_TARGET, "<=", "tiny HF GPT-2"),
        Target(
            "hf_step: same weights as the hand loop (max rel diff)",
            raw["max_rel_weight_diff"],
            SAME_WEIGHTS_REL,
            "<=",
            "round-off only",
        ),
    ]
