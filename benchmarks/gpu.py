"""Benchmark 6 (`python -m benchmarks --gpu`): ours vs the hand loop on one NVIDIA GPU.

The example LM scaled up (6 layers, d_model 384, 256-token blocks, ~10M parameters), bf16
autocast around forward and loss in both contenders (ours: `precision="bf16"`), AdamW,
clipping, micro 16, K 4. Ours is `DDPTrainer` (world 1, NCCL); the hand loop is nanoGPT's single-GPU loop (no DDP
wrapper, as nanoGPT runs on one GPU). Same data in the same order, one step each in turn,
CUDA synchronised before every clock read. Target: ours >= 0.98x the hand loop's tokens/s.
Refuses (exit 2) without CUDA.
"""

from __future__ import annotations

import random
import time
from functools import partial
from typing import Any

from benchmarks.common import Target, paired_ratios, shuffled, summary

NAME = "gpu"
TARGET = 0.98


def gpu_task() -> Any:
    import torch

    from trainers.example import TinyGPT, count_targets, pad_collate, text_sequences, token_loss_sum
    from trainers.task import Task

    return Task(
        partial(TinyGPT, block_size=256, n_layer=6, n_head=6, d_model=384),
        text_sequences(min_len=129, max_len=257),
        token_loss_sum,
        partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1),
        pad_collate,
        count=count_targets,
        clip_grad_norm=1.0,
        name="example LM, 6 layers, d_model 384, bf16 autocast",
    )


class _HandLoop:
    """nanoGPT on one GPU: no wrapper, (sum, count) loss scaled by the step's token count."""

    def __init__(self, task: Any, plan: Any, device: Any) -> None:
        import torch

        from benchmarks.contenders import DataFeed

        torch.manual_seed(task.seed)
        self.task, self.device = task, device
        self.model = task.model().to(device)
        self.optimizer = task.optimizer(self.model.parameters())
        self.feed = DataFeed(task, plan, 0)

    def train_steps(self, n: int) -> None:
        import torch

        for _ in range(n):
            micro = self.feed.next_step()
            scale = 1.0 / float(sum(self.task.count(b) for b in micro))
            for b in micro:
                b = tuple(t.to(self.device, non_blocking=True) for t in b)
                with torch.autocast(self.device.type, dtype=torch.bfloat16):  # forward and loss, as nanoGPT
                    loss = self.task.loss(self.model, b)[0]
                (loss * scale).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.task.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class _Ours:
    def __init__(self, task: Any, plan: Any) -> None:
        from trainers import DDPTrainer

        # the trainer's own mixed precision: autocast to bf16 around forward and loss
        self.trainer = DDPTrainer.from_task(task, plan, shuffle=False, drop_last=True, log=False, precision="bf16")

    def train_steps(self, n: int) -> None:
        self.trainer.train(n)


def run(cfg: dict[str, Any], device_type: str = "cuda") -> dict[str, Any]:
    """Ours and the hand loop take turns, one optimizer step each; tokens/s of every step."""
    import torch

    from benchmarks.contenders import DataFeed
    from benchmarks.workloads import plan_for

    device = torch.device(device_type)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    task = gpu_task()
    plan = plan_for(cfg["micro"], cfg["k"], 1)
    contenders = {"ours": _Ours(task, plan), "hand": _HandLoop(task, plan, device)}
    # Both read the same global batches in the same order: a round's tokens are the same for
    # both, counted from a feed of our own.
    counter = DataFeed(task, plan, 0)
    rng = random.Random(0)
    tokens_per_s: dict[str, list[float]] = {"ours": [], "hand": []}
    for i in range(cfg["warmup"] + cfg["steps"]):
        tokens = sum(len(task.dataset[j]) - 1 for ix in counter.next_indices() for j in ix)
        for name in shuffled(list(contenders), rng):
            sync()
            t0 = time.perf_counter()
            contenders[name].train_steps(1)
            sync()
            if i >= cfg["warmup"]:
                tokens_per_s[name].append(tokens / (time.perf_counter() - t0))
    from benchmarks.workloads import max_weight_diff

    # Same work? Reported, not a target: bf16 kernels may differ in round-off between calls.
    _abs, rel = max_weight_diff(contenders["hand"].model, contenders["ours"].trainer.module)
    props = torch.cuda.get_device_properties(device) if device_type == "cuda" else None
    return {
        "device": props.name if props else device_type,
        "device_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "task": task.name,
        "parameters": sum(p.numel() for p in contenders["ours"].trainer.module.parameters()),
        "plan": plan.to_dict(),
        "tokens_per_s": tokens_per_s,
        "max_rel_weight_diff_hand_vs_ours": rel,
        "warmup": cfg["warmup"],
        "steps": cfg["steps"],
    }


def summarize(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    tps = raw["tokens_per_s"]
    ratio = paired_ratios(tps["ours"], tps["hand"])
    result = {**raw, "tokens_per_s": {k: summary(v) for k, v in tps.items()}, "ours_over_hand": ratio}
    target = Target("gpu: ours / hand loop tokens/s", ratio["median"], TARGET, ">=", f"{raw['device']}, bf16 autocast")
    return result, [target]
