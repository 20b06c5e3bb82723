"""Measurement trials for `gradaccum advise`: one short run of W processes per world size.

`gradaccum advise` (torch-free) starts W copies of `python -m trainers.advise_trial` with
torchrun's variables (`launcher.run.run_local_workers`); they join one gloo group and, all at
the same time so that the contention of W processes on this machine is in the figures:

- time each micro-step of a DDP model inside `no_sync()` — collate + forward + loss, then
  backward — over a few random micro-batches at each trial size (random, because padding
  makes a micro-batch's cost depend on its longest item);
- time the optimizer step (gradient clipping included when the task clips);
- with `--measure-link`, time gloo all-reduces of two sizes (small: latency; the gradient's
  size: bandwidth);
- time whole optimizer steps of the real `DDPTrainer` at the smallest size with K = 1 and
  K = 4: what the trainer adds per micro-step and per step beyond the raw figures;
- on rank 0 of the `--memory` trial, measure the peak memory per micro-batch the way
  `--micro-batch-size auto` does (`trainers.autobatch.trial_step` between resets of the
  resident-set high-water mark), before any of the above is built.

Each rank reports its own times; rank 0 keeps the slowest rank's (a synchronous step waits
for it) and writes one JSON file (atomically). Nothing is printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any

from launcher.atomic import write_json_atomic
from launcher.errors import UserError

WARMUP = 2
REPEATS = 5
SMALL_ALLREDUCE_BYTES = 4096
#: accumulation steps of the real-trainer steps that calibrate its overheads
CALIBRATION_KS = (1, 4)


def _robust_mean(values: list[float]) -> float:
    """Mean without the fastest and slowest sample (one stall on a shared machine is not the rule)."""
    values = sorted(values)
    return statistics.fmean(values[1:-1] if len(values) > 3 else values)


def _collate(task: Any):
    from torch.utils.data import default_collate

    return task.collate or default_collate


def measure_memory(task: Any, sizes: list[int]) -> list[list[int]]:
    """(micro, peak bytes) per size: autobatch's trial step, each between peak resets."""
    from trainers.autobatch import peak_rss_bytes, reset_peak_rss, trial_step

    points = []
    for m in sizes:
        trial_step(task, m, before_measured_step=reset_peak_rss)
        points.append([m, peak_rss_bytes()])
    return points


def measure_micro_steps(ddp: Any, task: Any, sizes: list[int], seed: int) -> dict[int, tuple[float, float]]:
    """Per size: (collate+forward+loss seconds, backward seconds), without gradient sync.

    The sizes take turns within each repeat, so a change of load on a shared machine
    shifts all sizes alike instead of tilting the fitted line."""
    import torch.distributed as dist

    collate, rng, n = _collate(task), random.Random(seed), len(task.dataset)
    fwd: dict[int, list[float]] = {m: [] for m in sizes}
    bwd: dict[int, list[float]] = {m: [] for m in sizes}
    for rep in range(WARMUP + REPEATS):
        for m in sizes:
            dist.barrier()  # every rank measures the same size at the same time
            idx = rng.sample(range(n), m) if m <= n else [rng.randrange(n) for _ in range(m)]
            with ddp.no_sync():
                t0 = time.perf_counter()
                loss = task.loss(ddp, collate([task.dataset[i] for i in idx]))
                loss = loss[0] if isinstance(loss, tuple) else loss
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
            if rep >= WARMUP:
                fwd[m].append(t1 - t0)
                bwd[m].append(t2 - t1)
    ddp.zero_grad(set_to_none=False)
    return {m: (_robust_mean(fwd[m]), _robust_mean(bwd[m])) for m in sizes}


def measure_optimizer_step(ddp: Any, optimizer: Any, task: Any) -> float:
    import torch

    times = []
    for rep in range(WARMUP + REPEATS):
        for p in ddp.parameters():
            if p.grad is not None:
                p.grad.normal_(0, 1e-3)
        t0 = time.perf_counter()
        if task.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), task.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if rep >= WARMUP:
            times.append(time.perf_counter() - t0)
    return _robust_mean(times)


def measure_allreduce(nbytes: int) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    times = []
    for rep in range(WARMUP + 2 * REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        if rep >= WARMUP:
            times.append(time.perf_counter() - t0)
    return _robust_mean(times)


def measure_trainer_steps(task: Any, world: int, micro: int, ks: tuple[int, ...]) -> dict[int, float]:
    """Seconds per optimizer step of the real DDPTrainer at `micro` for each K in `ks`.

    The raw micro-step times above miss what the trainer adds around them (sampling, loss
    scaling, metrics, the step's small all-reduce): these steps calibrate that. The trainers
    take turns, one step each, as `train()`'s loop body runs them."""
    import torch.distributed as dist

    from launcher.plan import BatchPlan
    from trainers.ddp import DDPTrainer

    trainers = {
        k: DDPTrainer.from_task(task, BatchPlan.solve(world * micro * k, micro, world_size=world), log=False)
        for k in ks
    }
    times: dict[int, list[float]] = {k: [] for k in ks}
    for rep in range(WARMUP + 2 * REPEATS):
        for k, trainer in trainers.items():
            dist.barrier()
            t0 = time.perf_counter()
            trainer.step([trainer.micro_batch(ix) for ix in trainer.sampler.next_step()])
            if rep >= WARMUP:
                times[k].append(time.perf_counter() - t0)
    for trainer in trainers.values():
        if trainer.watchdog is not None:
            trainer.watchdog.stop()
    return {k: _robust_mean(v) for k, v in times.items()}


def _nbytes(tensors: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def run_trial(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainers.ddp import DDP_DEFAULTS
    from trainers.distributed import init_distributed
    from trainers.task import load_task

    task = load_task(args.task)
    sizes = sorted(set(args.sizes))
    info = init_distributed(None, "gloo")
    result: dict[str, Any] = {"world_size": info.world_size, "threads": torch.get_num_threads()}
    if args.memory and info.rank == 0:
        result["memory"] = measure_memory(task, sizes)
    dist.barrier()
    torch.manual_seed(task.seed)
    ddp = DDP(task.model(), **DDP_DEFAULTS)
    optimizer = task.optimizer(ddp.parameters())
    times = measure_micro_steps(ddp, task, sizes, seed=task.seed + info.rank)
    # a synced backward, so that the optimizer has gradients and state to time
    loss = task.loss(ddp, _collate(task)([task.dataset[0]]))
    (loss[0] if isinstance(loss, tuple) else loss).backward()
    optimizer_s = measure_optimizer_step(ddp, optimizer, task)
    params = [p for p in ddp.module.parameters()]
    grad_bytes = _nbytes(p for p in params if p.requires_grad)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    link = None
    if args.measure_link and info.world_size > 1:
        large = max(grad_bytes, 1 << 20)
        link = [[SMALL_ALLREDUCE_BYTES, measure_allreduce(SMALL_ALLREDUCE_BYTES)], [large, measure_allreduce(large)]]
    calibration = measure_trainer_steps(task, info.world_size, sizes[0], CALIBRATION_KS)
    mine = {"times": times, "optimizer_step_s": optimizer_s, "link": link, "trainer": calibration}
    everyone: list[Any] = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    if info.rank == 0:
        slowest = {m: tuple(max(r["times"][m][i] for r in everyone) for i in (0, 1)) for m in sizes}
        result.update(
            forward=[[m, slowest[m][0]] for m in sizes],
            backward=[[m, slowest[m][1]] for m in sizes],
            optimizer_step_s=max(r["optimizer_step_s"] for r in everyone),
            gradient_bytes=grad_bytes,
            parameter_bytes=_nbytes(params),
            optimizer_state_bytes=_nbytes(state),
            allreduce=None
            if link is None
            else [[b, max(r["link"][i][1] for r in everyone)] for i, (b, _) in enumerate(link)],
            trainer_steps={
                "micro_batch_size": sizes[0],
                "step_s": [[k, max(r["trainer"][k] for r in everyone)] for k in CALIBRATION_KS],
            },
            tokens_per_sample=_tokens_per_sample(task),
            available_bytes=_available_bytes(),
        )
    dist.barrier()
    dist.destroy_process_group()
    return result


def _tokens_per_sample(task: Any) -> float | None:
    """Mean of Task.count over (up to 512) single items: what tokens/s counts."""
    if task.count is None:
        return None
    collate, n = _collate(task), min(len(task.dataset), 512)
    return statistics.fmean(float(task.count(collate([task.dataset[i]]))) for i in range(n))


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.advise_trial")
    parser.add_argument("--task", required=True)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], required=True)
    parser.add_argument("--output", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--measure-link", action="store_true")
    parser.add_argument("--memory", action="store_true", help="rank 0 measures peak memory per micro-batch first")
    args = parser.parse_args(argv)
    try:
        result = run_trial(args)
    except UserError as e:  # a task that cannot be loaded: the advisor prints this, exit 2
        if os.environ.get("RANK", "0") == "0":
            write_json_atomic(args.output, {"error": str(e)})
        return 2
    if "forward" in result:
        write_json_atomic(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
