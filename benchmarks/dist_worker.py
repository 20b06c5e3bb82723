"""The rank side of the multi-process benchmarks: one torchrun launch runs all of them.

    python -m benchmarks.dist_worker --config CFG.json --output RAW.json   # under torchrun's variables

`python -m benchmarks` starts two of these with `launcher.run.run_local_workers` (what
`gradaccum launch --launcher local` runs). One launch for every distributed benchmark saves
a torch import and a rendezvous per benchmark (seconds each on a loaded 2-core machine); every comparison is still interleaved
within its own benchmark. Rank 0 writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import rotated
from launcher.atomic import write_json_atomic


class Context:
    def __init__(self, rank: int, world: int, threads: int, quick: bool) -> None:
        self.rank, self.world, self.threads, self.quick = rank, world, threads, quick

    def slowest_rank(self, seconds: float) -> float:
        """The block's time on the slowest rank (they finish together, give or take)."""
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def interleave(self, contenders: dict[str, Any], reps: int, warmup: int, steps: int) -> dict[str, list[float]]:
        """Milliseconds per optimizer step of each contender, per repetition, in rotating order."""
        ms: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(reps):
            for name in rotated(list(contenders), rep):
                torch.set_num_threads(self.threads)  # a contender may have changed it
                dist.barrier()
                seconds = contenders[name].run_block(warmup, steps)
                ms[name].append(self.slowest_rank(seconds) / steps * 1000.0)
        return ms


def jobs() -> dict[str, Any]:
    from benchmarks import comm, microbatch, overhead

    return {"training": overhead.worker_job, "comm": comm.worker_job, "microbatch": microbatch.worker_job}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dist_worker")
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    # stdout belongs to the driver's table: whatever a library prints goes to stderr
    os.dup2(2, 1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    from trainers.distributed import init_distributed, shutdown

    threads = int(cfg.get("threads", 1))
    torch.set_num_threads(threads)
    # A rank that stops answering ends the run with an error instead of hanging it.
    info = init_distributed(None, "gloo", timeout_s=float(cfg.get("collective_timeout_s", 300)))
    ctx = Context(info.rank, info.world_size, threads, bool(cfg.get("quick")))
    known = jobs()
    raw: dict[str, Any] = {"world_size": info.world_size, "backend": info.backend, "torch": torch.__version__}
    for name, job_cfg in cfg["jobs"].items():
        t0 = time.perf_counter()
        raw[name] = known[name](job_cfg, ctx)
        raw[name]["wall_s"] = time.perf_counter() - t0
        if ctx.rank == 0:
            print(f"benchmarks: {name} done in {raw[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    if ctx.rank == 0:
        write_json_atomic(args.output, raw)
    shutdown(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
