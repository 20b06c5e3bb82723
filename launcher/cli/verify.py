"""`gradaccum verify`: single-device reference vs the distributed run, step by step."""

from __future__ import annotations

import argparse

from launcher.cli.common import info, print_json

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
    p.add_argument("--task", default="trainers.example:task", metavar="MODULE:FUNCTION", help="FUNCTION() -> Task")
    p.add_argument("--global-batch-size", type=int, metavar="G", help="default: micro × accumulation 3 × processes")
    p.add_argument("--micro-batch-size", type=int, metavar="M", help="default 4")
    p.add_argument("--gradient-accumulation-steps", type=int, metavar="K", help="default: derived, or 3")
    p.add_argument("--nproc-per-node", type=int, default=2, metavar="P", help="worker processes (default 2)")
    p.add_argument("--steps", type=int, default=4, metavar="S", help="optimizer steps (default 4)")
    p.add_argument("--backend", choices=("ddp", "deepspeed"), default="ddp", help="distributed trainer (default ddp)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=0, help="DeepSpeed ZeRO stage (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="global batch t = items [t*G, (t+1)*G)")
    p.add_argument("--output-dir", default="gradaccum-verify", metavar="DIR", help="default ./gradaccum-verify")
    p.add_argument(
        "--tolerance", type=float, default=1e-5, metavar="REL", help="max relative difference (default 1e-5, fp32)"
    )
    p.add_argument(
        "--sync-every-micro-step",
        action="store_true",
        help="demonstration: disable no_sync, so every micro-step all-reduces (K rounds per step)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    )
    report = verify(opts, log=info)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0 if report["passed"] else 1
