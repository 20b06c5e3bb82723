"""Benchmark 4, memory vs K: backward per micro-batch (loop 1, ours) vs one stacked backward (loop 2).

The example LM at a fixed micro-batch, K = 1, 2, 4, 8, 16; the second optimizer step of a
fresh process per point (the first one loads code, kernels and the optimizer's state) (a fork of a process that imported torch and nothing else,
so no allocator state carries over between points):
  loop 1: per micro-batch: forward, loss_sum / count, backward; then step
  loop 2: forward all K micro-batches, sum their losses, one backward; then step
  ours:   DDPTrainer.step(micro_batches) (one process)
Peak memory on CPU is the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the step, so nothing earlier counts and no short peak
is missed between samples) minus the RSS at that moment: model, optimizer and the K
collated micro-batches are already there. Large blocks are mmap'ed (MALLOC_MMAP_THRESHOLD_)
so that freed activations leave the RSS. On a GPU: torch.cuda.max_memory_allocated.
(examples/two_loops.py shows the same effect on an MLP with a 1 ms psutil sampler.)
Target: ours at the largest K is <= 1.05x ours at K = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Any

from benchmarks.common import Target, child_env, run_checked

NAME = "memory"
TARGET = 1.05
VARIANTS = ("loop1", "loop2", "ours")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Driver side: one child that forks a fresh process per (K, variant, repetition)."""
    argv = [sys.executable, "-m", "benchmarks.memory", "--config", json.dumps(cfg)]
    # Blocks of 64 KiB and more come from mmap and go back to the OS when freed, so RSS
    # follows live tensors instead of what glibc's heap happens to keep (as the CUDA
    # allocator's max_memory_allocated does on a GPU). The same for every point.
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    out = run_checked(argv, timeout=cfg.get("timeout_s", 400), env=env)
    return json.loads(out.strip().splitlines()[-1])


def summarize(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    peaks = {v: {k: statistics.median(xs) for k, xs in raw["peak_bytes"][v].items()} for v in VARIANTS}
    ks = sorted(int(k) for k in peaks["ours"])
    first, last = str(ks[0]), str(ks[-1])
    growth = {v: peaks[v][last] / peaks[v][first] for v in VARIANTS}
    result = {**raw, "median_peak_bytes": peaks, "growth_first_to_last_k": growth, "ks": ks}
    target = Target(
        f"memory: ours peak at K={last} / K={first}",
        growth["ours"],
        TARGET,
        "<=",
        f"peak memory above model + data for one optimizer step, {raw['measure']}",
    )
    return result, [target]


# ---------------------------------------------------------------- child process
def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)[1])


def measure_point(variant: str, k: int, micro: int, device: str) -> int:
    """Bytes of peak memory above model + optimizer + data for one optimizer step."""
    import torch

    from benchmarks.workloads import lm_task, plan_for
    from trainers.accumulate import MicroBatch

    task = lm_task()
    # The same micro-batch K times (separate copies): only K changes between points, not
    # the padded width of the widest micro-batch, which the peak would follow.
    first = task.collate([task.dataset[j] for j in range(micro)])
    batches = [tuple(t.clone().to(device) for t in first) for _ in range(k)]
    count = float(sum(task.count(b) for b in batches))
    if variant == "ours":
        from trainers import DDPTrainer

        trainer = DDPTrainer.from_task(task, plan_for(micro, k, 1), log=False)
        micro_batches = [MicroBatch(b, micro) for b in batches]
        step = lambda: trainer.step(micro_batches)  # noqa: E731
    else:
        torch.manual_seed(task.seed)
        model = task.model().to(device)
        optimizer = task.optimizer(model.parameters())

        def step() -> None:
            if variant == "loop1":
                for b in batches:
                    (task.loss(model, b)[0] / count).backward()  # each graph freed by its own backward
            else:
                (sum(task.loss(model, b)[0] for b in batches) / count).backward()  # K graphs alive
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # One step first: code pages, kernel caches and the optimizer's state are in place
    # before the measured step, which then shows what a step of K micro-batches adds.
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _vm_kib("VmRSS")
    step()
    return (_vm_kib("VmHWM") - base) * 1024


def _in_fresh_process(variant: str, k: int, micro: int, device: str) -> int:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, leave without running atexit handlers
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, str(measure_point(variant, k, micro, device)).encode())
            status = 0
        except BaseException as e:  # noqa: BLE001 - the parent reports it
            os.write(2, f"memory point {variant} K={k} failed: {e!r}\n".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise RuntimeError(f"memory point {variant} K={k} failed (wait status {status})")
    return int(text)


def child_main(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    # Imported once here, before any fork, so that no point pays for imports; no compute
    # runs here, so the forks inherit no allocator state and no thread pool.
    import torch._dynamo  # noqa: F401 - the first optimizer step imports it: 2+ s per fork otherwise

    import benchmarks.workloads  # noqa: F401
    import trainers  # noqa: F401
    import trainers.example  # noqa: F401

    torch.set_num_threads(1)  # the same threads at every point
    device = cfg.get("device", "cpu")
    peaks: dict[str, dict[str, list[int]]] = {v: {} for v in VARIANTS}
    for rep in range(cfg["reps"]):
        for k in cfg["ks"]:
            for variant in VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]:
                measure = _in_fresh_process if device == "cpu" else measure_point
                peaks[variant].setdefault(str(k), []).append(measure(variant, k, cfg["micro"], device))
    return {
        "device": device,
        "measure": "torch.cuda.max_memory_allocated" if device != "cpu" else "VmHWM - VmRSS (fresh process per point)",
        "micro": cfg["micro"],
        "reps": cfg["reps"],
        "peak_bytes": peaks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    p.add_argument("--config", required=True, help="JSON: ks, micro, reps[, device]")
    cfg = json.loads(p.parse_args(argv).config)
    print(json.dumps(child_main(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
