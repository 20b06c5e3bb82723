"""`gradaccum verify`: single-device reference vs the distributed run, step by step."""

from __future__ import annotations

import argparse

from launcher.cli.common import info, print_json
from launcher.errors import UserError
from launcher.plan import PRECISIONS, BatchPlan

ORDER = 60
DEFAULT_MICRO_BATCH_SIZE = 4
DEFAULT_ACCUMULATION_STEPS = 3
#: default --tolerance (max relative parameter difference against the fp32 reference) for the
#: precision of the distributed run; the measurements behind them are in the README, "Mixed precision"
DEFAULT_TOLERANCES = {"fp32": 1e-5, "bf16": 1.0, "fp16": 1e-1}
#: the trainers' default --collective-timeout (trainers.distributed.DEFAULT_COLLECTIVE_TIMEOUT_S)
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


def resolve_tolerance(tolerance: float | None, precision: str) -> float:
    """--tolerance, or the default for the precision of the distributed run."""
    return DEFAULT_TOLERANCES[precision] if tolerance is None else tolerance


def check_precision_options(precision: str, collective_timeout: float | None) -> None:
    """--precision / --collective-timeout, before torch is imported."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if collective_timeout is not None and not 0 < collective_timeout < float("inf"):
        raise UserError(
            f"--collective-timeout must be a positive number of seconds, got {collective_timeout}; "
            f"the default is {DEFAULT_COLLECTIVE_TIMEOUT_S:g}"
        )


def resolve_plan(
    global_batch_size: int | None, micro_batch_size: int | None, accumulation_steps: int | None, world_size: int
) -> BatchPlan:
    """The flags' plan; what is not given defaults to micro 4 × accumulation 3 per rank."""
    g, m, k = global_batch_size, micro_batch_size, accumulation_steps
    if g is None:
        m = DEFAULT_MICRO_BATCH_SIZE if m is None else m
        k = DEFAULT_ACCUMULATION_STEPS if k is None else k
    elif m is None and k is None:
        return BatchPlan.solve(g, world_size=world_size, max_micro_batch_size=DEFAULT_MICRO_BATCH_SIZE)
    return BatchPlan.solve(g, m, k, world_size=world_size)


def check_options(backend: str, steps: int, nproc_per_node: int, tolerance: float | None, task: str = "m:f") -> None:
    """Cheap checks before torch is imported, so that bad input fails at once."""
    module, sep, function = task.partition(":")
    if not (module and sep and function):
        raise UserError(f"--task must look like MODULE:FUNCTION (e.g. trainers.example:task), got {task!r}")
    if backend not in ("ddp", "deepspeed"):
        raise UserError(f"--backend must be ddp or deepspeed, got {backend!r}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if tolerance is not None and not tolerance > 0:
        raise UserError(f"--tolerance must be positive, got {tolerance}")


def check_backend_options(
    backend: str,
    plan: BatchPlan,
    zero_stage: int | None = None,
    deepspeed_config: str | None = None,
    sync_every_micro_step: bool = False,
    precision: str | None = None,
    resume_nproc_per_node: int | None = None,
) -> dict | None:
    """DeepSpeed flags, before any process starts: the JSON is read and rendered under the plan
    here, so batch keys that disagree with it fail now, naming both values. Returns the config."""
    if backend != "deepspeed":
        if zero_stage is not None or deepspeed_config is not None:
            raise UserError("--zero-stage and --deepspeed-config are for --backend deepspeed")
        return None
    if sync_every_micro_step:
        raise UserError("--sync-every-micro-step is a DDP demonstration; DeepSpeed decides when it communicates")
    if precision not in (None, "fp32"):
        raise UserError(
            f"--backend deepspeed --precision {precision}: DeepSpeed casts the model to {precision} at start-up, so "
            "its weights differ from the fp32 reference before the first step and verify cannot compare them. "
            "Verify DeepSpeed in fp32, and 16-bit accumulation with --backend ddp; the README's DeepSpeed section gives "
            "DeepSpeed's measured bf16 figures"
        )
    from launcher import configs

    path = deepspeed_config
    base = configs.load_json_file(path, "DeepSpeed config (--deepspeed-config)") if path else None
    config = configs.deepspeed_config(plan, base, zero_stage=zero_stage, precision=precision)
    if config["zero_optimization"]["stage"] not in (0, 1, 2):
        raise UserError(
            f"gradaccum verify runs DeepSpeed at ZeRO stages 0, 1 and 2; the config asks for "
            f"{config['zero_optimization']['stage']}"
        )
    stage = config["zero_optimization"]["stage"]
    if stage >= 1 and resume_nproc_per_node not in (None, plan.world_size):
        raise UserError(
            f"--resume-nproc-per-node {resume_nproc_per_node} with ZeRO {stage}: DeepSpeed keeps ZeRO 1/2 optimizer "
            f"state in one file per data-parallel rank and cannot re-partition it for another world size; "
            f"use --zero-stage 0 (resumes at any world size) or resume at {plan.world_size} processes"
        )
    return config


def check_interrupt_options(
    steps: int, interrupt_at_step: int | None, resume_nproc_per_node: int | None, plan: BatchPlan
) -> None:
    """--interrupt-at-step / --resume-nproc-per-node, before torch is imported."""
    if interrupt_at_step is None:
        if resume_nproc_per_node is not None:
            raise UserError("--resume-nproc-per-node needs --interrupt-at-step S (after which step to kill the run)")
        return
    if not 1 <= interrupt_at_step < steps:
        raise UserError(
            f"--interrupt-at-step must be between 1 and {steps - 1} (--steps {steps}: steps must be left to resume), "
            f"got {interrupt_at_step}"
        )
    if resume_nproc_per_node is not None:
        if resume_nproc_per_node < 1:
            raise UserError(f"--resume-nproc-per-node must be at least 1, got {resume_nproc_per_node}")
        plan.with_world_size(resume_nproc_per_node)  # PlanError names the world sizes that keep the batch


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="prove the distributed run equals a single-device run (default: built-in example, 2 processes)",
        description=(
            "Run the task on one process with the whole global batch per step (the reference) and as real "
            "worker processes with gradient accumulation (torchrun, gloo on CPU); compare every parameter "
            "after every optimizer step. Exits 1 when the difference exceeds the tolerance."
        ),
        epilog="example: gradaccum verify --nproc-per-node 2 --global-batch-size 24 --micro-batch-size 4 --steps 4",
    )
    p.add_argument("--task", default="trainers.example:task", metavar="MODULE:FUNCTION", help="FUNCTION() -> Task")
    p.add_argument("--global-batch-size", type=int, metavar="G", help="default: micro × accumulation 3 × processes")
    p.add_argument("--micro-batch-size", type=int, metavar="M", help="default 4")
    p.add_argument("--gradient-accumulation-steps", type=int, metavar="K", help="default: derived, or 3")
    p.add_argument("--nproc-per-node", type=int, default=2, metavar="P", help="worker processes (default 2)")
    p.add_argument("--steps", type=int, default=4, metavar="S", help="optimizer steps (default 4)")
    p.add_argument("--backend", choices=("ddp", "deepspeed"), default="ddp", help="distributed trainer (default ddp)")
    p.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2), help="--backend deepspeed: ZeRO stage (default: the JSON's, or 0)"
    )
    p.add_argument(
        "--deepspeed-config",
        metavar="FILE",
        help="--backend deepspeed: your DeepSpeed JSON, merged under the plan (its batch keys must agree)",
    )
    p.add_argument("--no-shuffle", action="store_true", help="global batch t = items [t*G, (t+1)*G)")
    p.add_argument("--output-dir", default="gradaccum-verify", metavar="DIR", help="default ./gradaccum-verify")
    p.add_argument(
        "--tolerance",
        type=float,
        metavar="REL",
        help="max relative difference (default by --precision: 1e-5 fp32, 1 bf16, 0.1 fp16)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="precision of the distributed run, compared with an fp32 reference (default fp32)",
    )
    p.add_argument(
        "--collective-timeout",
        type=float,
        metavar="SECONDS",
        help="a rank that stops answering for this long ends the run, which names it (default 300)",
    )
    p.add_argument(
        "--sync-every-micro-step",
        action="store_true",
        help="demonstration: disable no_sync, so every micro-step all-reduces (K rounds per step)",
    )
    p.add_argument(
        "--interrupt-at-step",
        type=int,
        metavar="S",
        help="SIGKILL the distributed run after the checkpoint of step S, resume it (--resume auto), compare",
    )
    p.add_argument(
        "--resume-nproc-per-node",
        type=int,
        metavar="P2",
        help="with --interrupt-at-step: resume at P2 processes (same global batch, plan re-solved)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_options(args.backend, args.steps, args.nproc_per_node, args.tolerance, args.task)
    check_precision_options(args.precision, args.collective_timeout)
    plan = resolve_plan(
        args.global_batch_size, args.micro_batch_size, args.gradient_accumulation_steps, args.nproc_per_node
    )
    check_interrupt_options(args.steps, args.interrupt_at_step, args.resume_nproc_per_node, plan)
    check_backend_options(
        args.backend,
        plan,
        args.zero_stage,
        args.deepspeed_config,
        args.sync_every_micro_step,
        args.precision,
        args.resume_nproc_per_node,
    )
    from trainers.verify import VerifyOptions, format_report, verify

    opts = VerifyOptions(
        task=args.task,
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        nproc_per_node=args.nproc_per_node,
        steps=args.steps,
        shuffle=not args.no_shuffle,
        output_dir=args.output_dir,
        tolerance=args.tolerance,
        sync_every_micro_step=args.sync_every_micro_step,
        backend=args.backend,
        zero_stage=args.zero_stage,
        deepspeed_config=args.deepspeed_config,
        precision=args.precision,
        collective_timeout=args.collective_timeout,
        interrupt_at_step=args.interrupt_at_step,
        resume_nproc_per_node=args.resume_nproc_per_node,
    )
    report = verify(opts, log=info)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0 if report["passed"] else 1
