"""`gradaccum env`: what this process detects (launcher, ranks, master, hosts)."""

from __future__ import annotations

import argparse

from launcher.cli.common import add_json_flag, print_json

ORDER = 40


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env",
        help="show which launcher started this process and its rank, world and master",
        description=(
            "Detect who started this process (torchrun, deepspeed, OpenMPI, MPICH/Intel MPI, Slurm, "
            "mpi4py, or nothing: a single process) and print rank, local rank, world size, node rank, "
            "master address/port and the job's hosts. Run it under your launcher to debug a cluster job, "
            "e.g. `srun gradaccum env` or `mpirun -np 2 gradaccum env --json`."
        ),
    )
    p.add_argument(
        "--no-mpi4py",
        action="store_true",
        help="do not ask mpi4py even when an MPI runtime is visible (it would initialise MPI)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launcher.env import detect

    found = detect(use_mpi4py=not args.no_mpi4py)
    if args.json:
        print_json(found.to_dict())
        return 0
    rows = found.to_dict()
    rows["launcher"] = found.launcher or "none (single process)"
    rows["hosts"] = " ".join(found.hosts) or "(unknown)"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0
