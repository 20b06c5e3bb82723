"""Two ways to accumulate gradients over K micro-batches, side by side.

    loop 1: for each micro-batch: forward, loss / K, backward;  step every K micro-batches
    loop 2: forward all K micro-batches, stack the outputs, one loss, one backward, step

Both compute the same update once the reduction is right (loop 2 with a *sum* over the
stacked outputs gives a gradient M*K times too large; with a mean it matches loop 1), but
loop 2 keeps all K graphs alive until its single backward: its activation memory grows
with K while loop 1's stays flat. This script shows both facts with numbers:

    python examples/two_loops.py                      # K = 1, 4, 16
    python examples/two_loops.py --json --width 256   # smaller, one JSON object on stdout

Peak memory per (loop, K): on CPU the peak RSS during the second optimizer step minus the
psutil RSS before it (Linux's exact high-water mark, or RSS sampled every millisecond
elsewhere); on a GPU torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn


def make_model(width: int, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def make_data(k: int, micro: int, width: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(micro, width, generator=g).to(device), torch.randn(micro, 1, generator=g).to(device))
        for _ in range(k)
    ]


def loop1(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    """Backward per micro-batch; each graph is freed by its own backward."""
    k = len(data)
    for x, y in data:
        loss = F.mse_loss(model(x), y) / k  # mean per micro-batch, then / K: the mean over K*M
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def loop2(model: nn.Module, optimizer: torch.optim.Optimizer, data, reduction: str = "mean") -> None:
    """Stack all K outputs, one loss, one backward: K graphs alive at once."""
    out = torch.cat([model(x) for x, _ in data])
    loss = F.mse_loss(out, torch.cat([y for _, y in data]), reduction=reduction)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(loop: str, k: int, args: argparse.Namespace, device: torch.device, steps: int | None = None) -> nn.Module:
    model = make_model(args.width, args.depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    data = make_data(k, args.micro_batch_size, args.width, device)
    for _ in range(steps or args.steps):
        if loop == "1":
            loop1(model, opt, data)
        else:
            loop2(model, opt, data, reduction="sum" if loop == "2-sum" else "mean")
    return model


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ------------------------------------------------------------------------ memory
def _high_water_mark() -> int | None:
    """Peak RSS of this process since the last reset (Linux VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_of(fn) -> int:
    """Peak RSS while fn() runs, above the RSS (psutil) just before it.

    Linux keeps the exact high-water mark and lets a process reset it (clear_refs 5), so a
    peak that lasts a millisecond is not missed; elsewhere, sample every millisecond.
    """
    import psutil

    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = _high_water_mark() is not None
    except OSError:
        exact = False
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    thread = None if exact else threading.Thread(target=sample, daemon=True)
    if thread:
        thread.start()
    try:
        fn()
    finally:
        done.set()
        if thread:
            thread.join()
    if exact:
        peak = _high_water_mark()
    return max(peak, proc.memory_info().rss) - base


def measure_here(loop: str, k: int, args: argparse.Namespace, device: torch.device) -> int:
    """Bytes of peak memory above model, data and gradients, during one (second) optimizer step."""
    model = make_model(args.width, args.depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    data = make_data(k, args.micro_batch_size, args.width, device)
    step = (lambda: loop1(model, opt, data)) if loop == "1" else (lambda: loop2(model, opt, data))
    step()  # warm-up: one-time allocations (thread pools, kernels) are not activations
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _peak_rss_of(step)


def return_freed_memory_to_the_os() -> bool:
    """glibc: serve blocks above 128 KiB by mmap, so that freeing one lowers RSS at once.

    By default glibc raises its mmap threshold after big frees and keeps freed activations
    resident; RSS would then show the largest earlier measurement, not this one.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,4,16", help="accumulation steps to measure (default 1,4,16)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps for the weight comparison")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exact_rss = device.type == "cuda" or return_freed_memory_to_the_os()

    ks = [int(k) for k in args.ks.split(",")]
    k_cmp = 4  # the weight comparison needs K > 1, not a large one
    reference = train("1", k_cmp, args, device)
    diff_sum = max_weight_diff(reference, train("2-sum", k_cmp, args, device))
    diff_mean = max_weight_diff(reference, train("2", k_cmp, args, device))
    memory = {}
    for k in ks:
        for loop in ("1", "2"):
            peak = measure_here(loop, k, args, device)
            memory.setdefault(str(k), {})[f"loop{loop}"] = peak
    result = {
        "device": device.type,
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "psutil RSS",
        "freed_memory_returned": exact_rss,
        "model": {"width": args.width, "depth": args.depth, "micro_batch_size": args.micro_batch_size},
        "weights_compared_at_k": k_cmp,
        "max_abs_weight_diff_loop2_sum": diff_sum,
        "max_abs_weight_diff_loop2_mean": diff_mean,
        "peak_bytes": memory,
    }
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    mib = 2**20
    print(f"MLP {args.depth}×{args.width}, micro-batch {args.micro_batch_size}, SGD, {args.steps} steps at K={k_cmp}")
    print(f"  loop 1 vs loop 2 with reduction='sum' (gradient M*K too large): max |Δw| = {diff_sum:.3e}")
    print(f"  loop 1 vs loop 2 with reduction='mean' (fixed):                max |Δw| = {diff_mean:.3e}")
    print(f"peak memory above model + data during an optimizer step ({result['memory_measure']}, {device.type}):")
    print(f"  {'K':>3}  {'loop 1: backward per micro-batch':>33}  {'loop 2: stacked, one backward':>30}  ratio")
    for k in ks:
        m1, m2 = memory[str(k)]["loop1"], memory[str(k)]["loop2"]
        print(f"  {k:>3}  {m1 / mib:>29.1f} MiB  {m2 / mib:>26.1f} MiB  {m2 / max(m1, 1):>5.1f}")
    if not exact_rss:
        print("  (the C library keeps freed memory: RSS may include earlier measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
