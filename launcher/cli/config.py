"""`gradaccum config deepspeed|ddp`: render configs from the plan."""

from __future__ import annotations

import argparse

from launcher.atomic import write_json_atomic
from launcher.cli.common import add_batch_args, add_world_args, info, plan_from_args, print_json
from launcher.configs import ddp_config, deepspeed_config, load_json_file

ORDER = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "config",
        help="write a DeepSpeed JSON or DDP config whose batch numbers come from the plan",
        description="Render a DeepSpeed JSON or a DDP config from the batch plan.",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    ds = kinds.add_parser(
        "deepspeed",
        help="DeepSpeed JSON (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)",
        epilog="example: gradaccum config deepspeed --global-batch-size 64 --micro-batch-size 4 --world-size 8 -o ds.json",
    )
    ddp = kinds.add_parser("ddp", help="settings for the DDP trainer")
    for sub in (ds, ddp):
        add_batch_args(sub)
        add_world_args(sub)
        sub.add_argument("-o", "--output", metavar="FILE", help="write here (atomically) instead of stdout")
        sub.set_defaults(func=run)
    ds.add_argument("--base", metavar="FILE", help="a DeepSpeed JSON to merge; its batch keys must agree with the plan")
    ds.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default: the base's, else 0)")
    ds.add_argument("--gradient-clipping", type=float, help="max gradient norm (default 0.0: off, written explicitly)")


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.kind == "deepspeed":
        base = load_json_file(args.base, "base DeepSpeed config") if args.base else None
        config = deepspeed_config(plan, base, zero_stage=args.zero_stage, gradient_clipping=args.gradient_clipping)
    else:
        config = ddp_config(plan)
    if args.output:
        write_json_atomic(args.output, config)
        info(f"wrote {args.output}")
    else:
        print_json(config)
    return 0
