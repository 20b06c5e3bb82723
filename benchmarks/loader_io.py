"""`python -m benchmarks.loader_io`: StepLoader workers on an I/O-bound dataset.

Each item waits 2 ms before it is returned (a read from network storage). Three contenders
take the same optimizer steps (same items, same order, the same small MLP step):
  hand     a hand-written loop over torch's DataLoader(num_workers=2) with the sampler's
           micro-batch lists as its batch sampler
  ours     trainers.loader.StepLoader(num_workers=2)
  ours-0   StepLoader(num_workers=0): reading on the training thread
Rounds alternate the contenders; the medians are compared. Targets: ours <= 1.02x hand's
time, and ours-0 / ours >= 1.7. Registered in `python -m benchmarks` as "loader_io"
(run/summarize); alone it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import Target
from launcher.plan import BatchPlan
from trainers.loader import StepLoader, _MicroBatchIndices
from trainers.sampler import GlobalBatchSampler


class SlowItems:
    """Map-style: item i is a feature vector, after a 2 ms wait."""

    def __init__(self, n: int, wait_s: float) -> None:
        self.n, self.wait_s = n, wait_s
        self.x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.wait_s)
        return self.x[i]


def _step(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for b in batches:
        model(b).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_once(name: str, data: SlowItems, plan: BatchPlan, steps: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    k = plan.gradient_accumulation_steps
    if name == "hand":
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=_MicroBatchIndices(GlobalBatchSampler(len(data), plan)), num_workers=2
        )
        it = iter(loader)
        next(it)  # workers started, as StepLoader's are after its first step
        began = time.perf_counter()
        for _ in range(steps):
            _step(model, opt, [next(it) for _ in range(k)])
        took = time.perf_counter() - began
        del it
        return took
    with StepLoader(data, plan, num_workers=2 if name == "ours" else 0) as loader:
        loader.next_step()
        began = time.perf_counter()
        for _ in range(steps):
            _step(model, opt, [mb.batch for mb in loader.next_step()])
        return time.perf_counter() - began


NAME = "loader_io"
OVER_HAND = 1.02
SPEEDUP = 1.7


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per contender over cfg["rounds"] alternating rounds of cfg["steps"] steps."""
    torch.set_num_threads(1)
    plan = BatchPlan(32, 8, 4, 1)
    data = SlowItems(plan.global_batch_size * (cfg["steps"] + 2), cfg["wait_ms"] / 1000)
    times: dict[str, list[float]] = {"hand": [], "ours": [], "ours-0": []}
    for _ in range(cfg["rounds"]):
        for name in times:
            times[name].append(run_once(name, data, plan, cfg["steps"]))
    return {"times_s": times, "config": {**cfg, "plan": str(plan)}}


def summarize(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    med = {k: statistics.median(v) for k, v in raw["times_s"].items()}
    over_hand, speedup = med["ours"] / med["hand"], med["ours-0"] / med["ours"]
    result = {**raw, "median_s": med, "ours_over_hand": over_hand, "speedup_over_num_workers_0": speedup}
    wait = raw["config"]["wait_ms"]
    return result, [
        Target(f"{NAME}: num_workers=2 / hand DataLoader(num_workers=2)", over_hand, OVER_HAND, "<=",
               f"items waiting {wait} ms each"),
        Target(f"{NAME}: num_workers=0 / num_workers=2", speedup, SPEEDUP, ">=", f"items waiting {wait} ms each"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader_io")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--wait-ms", type=float, default=2.0)
    args = p.parse_args(argv)
    result, targets = summarize(run({"rounds": args.rounds, "steps": args.steps, "wait_ms": args.wait_ms}))
    result["targets"] = [t.to_dict() for t in targets]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
