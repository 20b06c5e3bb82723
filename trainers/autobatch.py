"""Micro-batch from a memory budget: measure a few sizes, fit a line, take the largest that fits.

The planner stays pure: this module measures and returns numbers, `launcher.memory` fits
and chooses, `BatchPlan.solve` gets the chosen micro-batch like any other.

How the peak is measured:
- GPU: `torch.cuda.reset_peak_memory_stats()` then `max_memory_allocated()` around one
  trial step per size, in this process.
- CPU: each size runs in a short trial process of its own (`python -m trainers.autobatch
  --trial ...`: a fresh allocator per size) that resets the kernel's resident-set high-water
  mark (VmHWM, through /proc/self/clear_refs) after a warm-up step and reports the peak of the
  measured step; importing torch peaks higher than a small model's step and would hide it.
A trial step is what training does per micro-batch: forward, loss, backward, optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from launcher.errors import UserError
from launcher.memory import GiB, MemoryModel, choose_micro_batch_size, format_bytes, micro_options, options_table
from launcher.plan import BatchPlan

DEFAULT_TRIAL_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class AutoMicroBatch:
    plan: BatchPlan
    model: MemoryModel
    budget_bytes: float
    device: str

    def report(self) -> str:
        pts = ", ".join(f"micro {m}: {format_bytes(b)}" for m, b in self.model.points)
        lines = [
            f"measured peak memory ({self.device}): {pts}",
            f"fit: peak ≈ {format_bytes(self.model.base_bytes)} + {format_bytes(self.model.per_sample_bytes)} × micro",
            f"budget {format_bytes(self.budget_bytes)} (10% kept as margin): micro-batch {self.plan.micro_batch_size}, "
            f"accumulation {self.plan.gradient_accumulation_steps}",
            options_table(micro_options(self.plan, None, self.model, self.budget_bytes), self.budget_bytes),
        ]
        return "\n".join(lines)


def _trial_batch(task: Any, micro: int) -> Any:
    from torch.utils.data import default_collate

    items = [task.dataset[i % len(task.dataset)] for i in range(micro)]
    return (task.collate or default_collate)(items)


def trial_step(task: Any, micro: int, device: str = "cpu", before_measured_step: Any = None) -> None:
    """Two micro-steps of training at `micro` samples: forward, loss, backward, step.

    The first puts the optimizer state and allocator caches in place; `before_measured_step`
    runs between them (it resets the peak counter), so the peak is a steady step's."""
    import torch

    torch.manual_seed(task.seed)
    model = task.model().to(device)
    optimizer = task.optimizer(model.parameters())
    batch = _move(_trial_batch(task, micro), device)
    for i in range(2):
        if i == 1 and before_measured_step is not None:
            before_measured_step()
        out = task.loss(model, batch)
        loss = out[0] / max(float(out[1]), 1.0) if isinstance(out, tuple) else out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def parameter_count(task_spec: str) -> int:
    """Trainable parameters of the task's model (`--parameters` for the planner's model-state rows).

    Builds the model once on the CPU; a parameter shared by several modules counts once."""
    from trainers.task import load_task

    model = load_task(task_spec).model()
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def reset_peak_rss() -> None:
    """Linux keeps an exact resident-set high-water mark and lets a process reset it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak resident set since start or the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status (not Linux?)")


def _move(batch: Any, device: str) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def measure_peaks(
    task_spec: str, sizes: tuple[int, ...] = DEFAULT_TRIAL_SIZES, device: str = "cpu"
) -> list[tuple[int, int]]:
    """(micro, peak bytes) for each size: a trial process per size on CPU, in-process on GPU."""
    if device.startswith("cuda"):
        import torch

        from trainers.task import load_task

        task = load_task(task_spec)
        points = []
        for micro in sizes:
            torch.cuda.empty_cache()
            trial_step(task, micro, device, lambda: torch.cuda.reset_peak_memory_stats(device))
            points.append((micro, int(torch.cuda.max_memory_allocated(device))))
        return points
    from launcher.run import capture_command, python_module_argv

    points = []
    for micro in sizes:
        argv = python_module_argv("trainers.autobatch", "--trial", "--task", task_spec, "--micro", str(micro))
        result = capture_command(argv, timeout=600)
        if result.returncode != 0:
            raise UserError(
                f"trial step at micro-batch {micro} failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
            )
        points.append((micro, int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])))
    return points


def default_budget(device: str = "cpu", processes_per_device: int = 1) -> float:
    """Free memory of the device, shared by the processes that use it."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available / processes_per_device


def auto_micro_batch(
    task_spec: str,
    global_batch_size: int,
    world_size: int,
    *,
    budget_bytes: float | None = None,
    sizes: tuple[int, ...] | None = None,
    device: str = "cpu",
    processes_per_device: int = 1,
    model_parallel_size: int = 1,
    precision: str = "fp32",
) -> AutoMicroBatch:
    """Measure, fit, choose; return the plan with the largest micro-batch that fits."""
    base = BatchPlan.solve(global_batch_size, world_size=world_size, model_parallel_size=model_parallel_size)
    per_rank = base.global_batch_size // base.data_parallel_size
    sizes = tuple(s for s in (sizes or DEFAULT_TRIAL_SIZES) if s <= per_rank) or (1,)
    if len(sizes) < 2:
        sizes = (1, per_rank) if per_rank > 1 else (1, 2)
    points = measure_peaks(task_spec, sizes, device)
    model = MemoryModel.fit(points)
    budget = budget_bytes if budget_bytes is not None else default_budget(device, processes_per_device)
    choice = choose_micro_batch_size(global_batch_size, base.data_parallel_size, model, budget)
    plan = BatchPlan.solve(
        global_batch_size,
        choice.micro_batch_size,
        world_size=world_size,
        model_parallel_size=model_parallel_size,
        precision=precision,
    )
    return AutoMicroBatch(plan, model, budget, device)


def _trial_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.autobatch")
    parser.add_argument("--trial", action="store_true", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--micro", type=int, required=True)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the same threads at every size, so peaks compare
    from trainers.task import load_task

    # The peak of a steady step only: importing torch and building the model peak higher
    # than a small model's step, and would hide how the step grows with the micro-batch.
    trial_step(load_task(args.task), args.micro, before_measured_step=reset_peak_rss)
    print(json.dumps({"micro": args.micro, "peak_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))

__all__ = ["AutoMicroBatch", "auto_micro_batch", "measure_peaks", "trial_step", "default_budget", "GiB"]
