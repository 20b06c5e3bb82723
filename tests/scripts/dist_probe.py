"""Worker for the launcher tests: detect the environment, join a gloo group, all-reduce,
and write what it saw to OUT_DIR/rank-<rank>.json.

    dist_probe.py OUT_DIR [--steps N] [--sleep S] [--local_rank R]

With --steps, it keeps all-reducing (a stand-in for training) so that a test can kill
a rank mid-run; each rank writes its pid to OUT_DIR/pid-<rank> after its first all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    parser.add_argument("--mpi4py", action="store_true", help="also ask mpi4py for rank and size")
    args = parser.parse_args()

    raw = {k: v for k, v in os.environ.items() if k.startswith(("OMPI_COMM_WORLD_", "PMI_", "SLURM_"))}
    raw.update({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") if k in os.environ})

    from launcher.env import detect, export_torch_distributed_env
    from launcher.plan import BatchPlan

    before = detect().to_dict()
    # what a user debugging this job would see: `gradaccum env --json` inside the worker
    shown = subprocess.run(
        [sys.executable, "-m", "launcher", "env", "--json"], capture_output=True, text=True, check=True
    ).stdout
    cluster = export_torch_distributed_env()

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    total = 0.0
    for step in range(args.steps):
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        total = t.item()
        if step == 0:  # in the group and past the first collective: "mid-training" from here
            with open(os.path.join(args.out_dir, f"pid-{cluster.rank}"), "w") as f:
                f.write(str(os.getpid()))
        if args.sleep:
            time.sleep(args.sleep)
    mpi = None
    if args.mpi4py:
        from mpi4py import MPI

        mpi = {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size()}
    plan = BatchPlan.from_env()
    out = {
        "detected": before,
        "raw": raw,
        "dist_rank": dist.get_rank(),
        "dist_world_size": dist.get_world_size(),
        "allreduce_sum": total,
        "plan": plan.to_dict() if plan else None,
        "deepspeed_config": os.environ.get("GRADACCUM_DEEPSPEED_CONFIG"),
        "local_rank_arg": args.local_rank,
        "mpi4py": mpi,
        "gradaccum_env": json.loads(shown),
    }
    with open(os.path.join(args.out_dir, f"rank-{cluster.rank}.json"), "w") as f:
        json.dump(out, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
