"""`gradaccum verify`: single-device reference vs the distributed run, step by step.

The options are checked here, before torch is imported (launcher/verify_options.py); the run
itself is trainers/verify/, imported only then.
"""

from __future__ import annotations

import argparse

from launcher.cli.common import info, print_json
from launcher.plan import PRECISIONS
from launcher.trainer_backends import DEFAULT_TRAINER_BACKEND, FSDP_BLOCKS_HELP, backend_names, zero_stages
from launcher.verify_options import DEFAULT_TASK, VerifyOptions, check

ORDER = 60


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
    p.add_argument("--task", default=DEFAULT_TASK, metavar="MODULE:FUNCTION", help="FUNCTION() -> Task")
    p.add_argument("--global-batch-size", type=int, metavar="G", help="default: micro × accumulation 3 × processes")
    p.add_argument("--micro-batch-size", type=int, metavar="M", help="default 4")
    p.add_argument("--gradient-accumulation-steps", type=int, metavar="K", help="default: derived, or 3")
    p.add_argument("--nproc-per-node", type=int, default=2, metavar="P", help="worker processes (default 2)")
    p.add_argument("--steps", type=int, default=4, metavar="S", help="optimizer steps (default 4)")
    p.add_argument(
        "--backend",
        choices=backend_names(),
        default=DEFAULT_TRAINER_BACKEND,
        help=f"distributed trainer (default {DEFAULT_TRAINER_BACKEND})",
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        choices=zero_stages(),
        help="--backend deepspeed: ZeRO stage (default: the JSON's, or 0)",
    )
    p.add_argument(
        "--deepspeed-config",
        metavar="FILE",
        help="--backend deepspeed: your DeepSpeed JSON, merged under the plan (its batch keys must agree)",
    )
    p.add_argument("--fsdp-blocks", metavar="SPEC", help=FSDP_BLOCKS_HELP)
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
    checked = check(
        VerifyOptions(
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
            fsdp_blocks=args.fsdp_blocks,
            precision=args.precision,
            collective_timeout=args.collective_timeout,
            interrupt_at_step=args.interrupt_at_step,
            resume_nproc_per_node=args.resume_nproc_per_node,
        )
    )
    from trainers.verify import format_report, run_checked

    report = run_checked(checked, log=info)
    if args.json:
        print_json(report.to_dict())
    else:
        print(format_report(report))
    return 0 if report.passed else 1
