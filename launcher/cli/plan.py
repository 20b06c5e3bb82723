"""`gradaccum plan`: solve the batch triad and show it."""

from __future__ import annotations

import argparse

from launcher.cli.common import add_batch_args, add_json_flag, add_world_args, plan_from_args, print_json

ORDER = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="solve global = micro × accumulation × data-parallel and show the plan",
        description=(
            "Solve global batch = micro batch × accumulation steps × data-parallel size. "
            "Give two of the three batch numbers (or the global batch alone) and the world size. "
            "When the numbers do not fit, the error lists the nearest valid values."
        ),
        epilog="example: gradaccum plan --global-batch-size 96 --micro-batch-size 4 --nnodes 2 --nproc-per-node 4",
    )
    add_batch_args(p)
    add_world_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.json:
        out = plan.to_dict()
        out["samples_per_rank_per_step"] = plan.samples_per_rank_per_step
        out["allreduces_per_step"] = plan.allreduces_per_step
        print_json(out)
    else:
        print(plan.describe())
    return 0
