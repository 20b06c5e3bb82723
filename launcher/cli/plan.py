"""`gradaccum plan`: solve the batch triad and show it."""

from __future__ import annotations

import argparse
import dataclasses

from launcher.cli.common import (
    add_batch_args,
    add_json_flag,
    add_lr_args,
    add_world_args,
    arg_type,
    lr_rule_from_args,
    plan_from_args,
    print_json,
)
from launcher.errors import UserError
from launcher.memory import (
    OPTIMIZER_BYTES,
    MemoryModel,
    choose_micro_batch_size,
    micro_options,
    options_table,
    parse_bytes,
    parse_count,
    state_memory,
)
from launcher.trainer_backends import backend_names

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
    add_lr_args(p)
    p.add_argument(
        "--task",
        metavar="MODULE:FUNCTION",
        help="with --micro-batch-size auto: the task whose model is measured (e.g. trainers.example:task)",
    )
    m = p.add_argument_group("memory trade-off table (micro-batch / accumulation choices)")
    m.add_argument(
        "--memory-per-sample",
        type=arg_type(parse_bytes),
        metavar="SIZE",
        help="peak memory per micro-batch sample, e.g. 180MiB",
    )
    m.add_argument(
        "--memory-base",
        type=arg_type(parse_bytes),
        default=0,
        metavar="SIZE",
        help="peak memory at micro 0 beyond what --parameters accounts for (or all of it: weights, grads, "
        "optimizer state)",
    )
    m.add_argument(
        "--parameters",
        type=arg_type(parse_count),
        metavar="N",
        help="the model's parameter count: parameter, gradient and optimizer-state bytes per rank are derived "
        "from it, the precision and --optimizer, sharded as --backend/--zero-stage say, and added to the base "
        "(--micro-batch-size auto counts the --task model's parameters)",
    )
    m.add_argument(
        "--optimizer", choices=tuple(OPTIMIZER_BYTES), default="adam", help="with --parameters (default adam)"
    )
    m.add_argument(
        "--backend",
        choices=backend_names(),
        help="with --parameters: fsdp shards parameters, gradients and optimizer state over the data-parallel ranks",
    )
    m.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2, 3), help="with --parameters: DeepSpeed ZeRO stage (sharding)"
    )
    m.add_argument(
        "--memory-budget",
        type=arg_type(parse_bytes),
        metavar="SIZE",
        help="device memory to fit under (10%% is kept as margin)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    lr = lr_rule_from_args(args)
    options = state = None
    if args.parameters is None and args.micro_batch_size == "auto" and args.task:
        from trainers.autobatch import parameter_count  # auto has imported torch already

        args.parameters = parameter_count(args.task)
    if args.parameters is None and (args.backend is not None or args.zero_stage is not None):
        raise UserError("--backend and --zero-stage size the model state: give --parameters N with them")
    if args.backend not in (None, "deepspeed") and args.zero_stage is not None:
        raise UserError(f"--zero-stage is a DeepSpeed setting; --backend {args.backend} does not take it")
    if args.parameters is not None:
        state = state_memory(
            args.parameters,
            plan.data_parallel_size,
            precision=plan.precision,
            optimizer=args.optimizer,
            zero_stage=args.zero_stage,
            fsdp=args.backend == "fsdp",
        )
    if args.memory_per_sample is not None:
        base = args.memory_base + (state.total_bytes if state is not None else 0)
        model = MemoryModel(base, args.memory_per_sample)
        if (
            args.memory_budget is not None
            and args.micro_batch_size is None
            and args.gradient_accumulation_steps is None
        ):
            # Only the global batch was fixed: take the largest micro-batch that fits (the fastest).
            choice = choose_micro_batch_size(plan.global_batch_size, plan.data_parallel_size, model, args.memory_budget)
            plan = dataclasses.replace(
                plan,
                micro_batch_size=choice.micro_batch_size,
                gradient_accumulation_steps=choice.gradient_accumulation_steps,
            )
        options = micro_options(plan, None, model, args.memory_budget)
    if args.json:
        out = plan.to_dict()
        out["samples_per_rank_per_step"] = plan.samples_per_rank_per_step
        out["allreduces_per_step"] = plan.allreduces_per_step
        out["lr_scaling"] = lr.to_dict()
        out["lr"] = lr.lr_for(plan.global_batch_size)
        if options is not None:
            out["micro_batch_options"] = [vars(o) for o in options]
        if state is not None:
            out["model_state_memory"] = state.to_dict()
        print_json(out)
        return 0
    print(plan.describe())
    if lr.base_lr is not None:
        print(
            f"{'learning rate':<29}  {lr.lr_for(plan.global_batch_size):>6.4g}   "
            f"({lr.rule} scaling of {lr.base_lr:g} at batch {lr.base_batch_size or plan.global_batch_size}"
            + (f", {lr.warmup_steps} warm-up steps)" if lr.warmup_steps else ")")
        )
    if state is not None:
        print()
        print(state.describe())
    if options is not None:
        print()
        print(options_table(options, args.memory_budget))
    return 0
