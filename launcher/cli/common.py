"""Flags and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from launcher.errors import UserError
from launcher.lr import LR_RULES, LRRule
from launcher.plan import PRECISIONS, BatchPlan


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batch plan (give two of the three, or the global batch alone)")
    g.add_argument("--global-batch-size", type=int, metavar="G", help="samples per optimizer step, all ranks together")
    g.add_argument(
        "--micro-batch-size",
        type=micro_batch_arg,
        metavar="M",
        help="samples per forward/backward on one rank, or 'auto': measure the task's model and take the "
        "largest that fits the memory budget (needs --task where the command has it)",
    )
    g.add_argument("--gradient-accumulation-steps", type=int, metavar="K", help="micro-steps per optimizer step")
    g.add_argument(
        "--max-micro-batch-size",
        type=int,
        metavar="M",
        help="with the global batch alone: the largest micro-batch to consider (default: no limit)",
    )
    g.add_argument(
        "--model-parallel-size", type=int, default=1, metavar="N", help="ranks per model replica (default 1)"
    )
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="training precision recorded in the plan")


def micro_batch_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def auto_micro_plan(args: argparse.Namespace, world_size: int, processes_per_device: int) -> BatchPlan:
    """--micro-batch-size auto: measure the task's model, fit, choose (imports torch)."""
    task = getattr(args, "task", None)
    if not task:
        raise UserError(
            "--micro-batch-size auto measures a model: give --task MODULE:FUNCTION, or run "
            "`gradaccum plan --micro-batch-size auto --task ...` first and pass the micro-batch it picks"
        )
    if args.global_batch_size is None or args.gradient_accumulation_steps is not None:
        raise UserError("--micro-batch-size auto needs --global-batch-size and no --gradient-accumulation-steps")
    from trainers.autobatch import auto_micro_batch

    result = auto_micro_batch(
        task,
        args.global_batch_size,
        world_size,
        budget_bytes=getattr(args, "memory_budget", None),
        processes_per_device=processes_per_device,
        model_parallel_size=args.model_parallel_size,
        precision=args.precision,
    )
    info(result.report())
    return result.plan


def add_lr_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate tied to the global batch")
    g.add_argument(
        "--lr-scaling",
        choices=LR_RULES,
        default="none",
        help="linear (Goyal et al., for SGD with warm-up), sqrt (adaptive optimizers) or none (default)",
    )
    g.add_argument("--base-lr", type=float, metavar="LR", help="the learning rate that is right at --base-batch-size")
    g.add_argument("--base-batch-size", type=int, metavar="B", help="the global batch --base-lr was tuned for")
    g.add_argument(
        "--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up to the scaled lr (default 0)"
    )


def lr_rule_from_args(args: argparse.Namespace) -> LRRule:
    return LRRule(args.lr_scaling, args.base_lr, args.base_batch_size, args.warmup_steps)


def arg_type(parse):
    """Wrap a parser raising UserError so argparse shows its message (and exits 2)."""

    def convert(text: str):
        try:
            return parse(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def add_world_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("world size (--world-size, or --nnodes with --nproc-per-node)")
    g.add_argument("--world-size", type=int, metavar="W", help="total number of processes")
    g.add_argument("--nnodes", type=int, metavar="N", help="number of nodes")
    g.add_argument("--nproc-per-node", type=int, metavar="P", help="processes per node")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def world_size_from_args(args: argparse.Namespace) -> int:
    """--world-size, or --nnodes × --nproc-per-node; a missing or half-given world is an error."""
    nnodes, nproc = args.nnodes, args.nproc_per_node
    if args.world_size is not None:
        if nnodes is not None and nproc is not None and nnodes * nproc != args.world_size:
            raise UserError(
                f"--world-size {args.world_size} disagrees with --nnodes {nnodes} × "
                f"--nproc-per-node {nproc} = {nnodes * nproc}; give one or the other"
            )
        return args.world_size
    if nnodes is None and nproc is None:
        raise UserError("the world size is required: give --world-size W, or --nnodes N and --nproc-per-node P")
    if nnodes is None or nproc is None:
        missing = "--nnodes" if nnodes is None else "--nproc-per-node"
        raise UserError(f"{missing} is missing: give both --nnodes and --nproc-per-node, or --world-size")
    for flag, value in (("--nnodes", nnodes), ("--nproc-per-node", nproc)):
        if value <= 0:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    return nnodes * nproc


def plan_from_args(args: argparse.Namespace, world_size: int | None = None) -> BatchPlan:
    if world_size is None:
        world_size = world_size_from_args(args)
    if args.micro_batch_size == "auto":
        return auto_micro_plan(args, world_size, getattr(args, "nproc_per_node", None) or world_size)
    return BatchPlan.solve(
        args.global_batch_size,
        args.micro_batch_size,
        args.gradient_accumulation_steps,
        world_size=world_size,
        model_parallel_size=args.model_parallel_size,
        max_micro_batch_size=args.max_micro_batch_size,
        precision=args.precision,
    )


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """Progress and logs: stderr, so that `--json` keeps stdout clean."""
    print(message, file=sys.stderr, flush=True)
