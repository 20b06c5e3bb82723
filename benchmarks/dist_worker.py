"""The rank side of the multi-process benchmarks: one launch of two processes runs all of them.

    python -m benchmarks.dist_worker --config CFG.json --output RAW.json   # under torchrun's variables

`python -m benchmarks` starts two of these with `launcher.run.run_local_workers` (what
`gradaccum launch --launcher local` runs). One launch for every distributed benchmark saves
a torch import and a rendezvous per benchmark (seconds each on a loaded 2-core machine);
each comparison is still interleaved within its own benchmark. Rank 0 writes the raw
figures as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.atomic import write_json_atomic


class Context:
    def __init__(self, rank: int, world: int, threads: int, quick: bool) -> None:
        self.rank, self.world, self.threads, self.quick = rank, world, threads, quick

    def interleave(self, contenders: dict[str, Any], warmup: int, steps: int, seed: int = 0) -> dict[str, list[float]]:
        """Milliseconds of each contender's optimizer steps, taken in turns, one step each.

        Round i: every contender takes its step i (the same global batch for all), in an
        order shuffled per round (the same seed on every rank, so the collectives match),
        each step between two barriers so that no rank's lag leaks into the next
        contender. Paired per round, the ratios see the same machine state. The first
        `warmup` rounds are dropped. Returns the slowest rank's time per step.
        """
        rng = random.Random(seed)
        driver = next((c for c in contenders.values() if c.drives_loop), None)
        names = [name for name, c in contenders.items() if c is not driver]
        seconds: dict[str, list[float]] = {name: [] for name in contenders}

        def one_round(_i: int) -> None:
            order = list(names)
            rng.shuffle(order)
            for name in order:
                torch.set_num_threads(self.threads)  # a contender may have changed it
                dist.barrier()
                t0 = time.perf_counter()
                contenders[name].train_steps(1)
                seconds[name].append(time.perf_counter() - t0)
            torch.set_num_threads(self.threads)
            dist.barrier()  # the driver's next step starts on all ranks together

        # Everything built so far (torch, Lightning, the models) leaves the garbage collector's
        # view: a full collection then costs what the training steps allocate, not what happens
        # to be imported in this process, whichever contender it lands on.
        gc.collect()
        gc.freeze()
        try:
            if driver is None:
                for i in range(warmup + steps):
                    one_round(i)
            else:
                seconds[driver.name] = driver.drive(warmup + steps, one_round)
        finally:
            gc.unfreeze()
        ms = {}
        for name, values in seconds.items():
            t = torch.tensor(values[warmup:], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms[name] = (t * 1000.0).tolist()
        return ms


def jobs() -> dict[str, Any]:
    from benchmarks import comm, microbatch, overhead, zero3

    return {
        "training": overhead.worker_job,
        "comm": comm.worker_job,
        "microbatch": microbatch.worker_job,
        "zero3": zero3.worker_job,
    }


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
    from trainers.distributed import exit_worker

    exit_worker(main())  # no teardown abort after the work is done
