"""`gradaccum checkpoint inspect DIR`: what a checkpoint holds and whether it is complete."""

from __future__ import annotations

import argparse

from launcher.cli.common import add_json_flag, print_json
from launcher.errors import UserError

ORDER = 80


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="inspect checkpoints written by the trainers")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    inspect = actions.add_parser(
        "inspect",
        help="step, plan, world size and completeness of a checkpoint (or of every checkpoint under a root)",
    )
    inspect.add_argument("path", metavar="DIR", help="a checkpoint directory (step_N) or a checkpoint root")
    add_json_flag(inspect)
    inspect.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainers.checkpoint import MANIFEST, inspect_checkpoint, list_checkpoints

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"no such checkpoint directory: {path}")
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        reports = [inspect_checkpoint(path)]
    else:
        reports = [inspect_checkpoint(p) for p in list_checkpoints(path)]
        if not reports:
            raise UserError(f"{path} holds no checkpoint (no step_* directory)")
    if args.json:
        print_json(reports[0] if len(reports) == 1 else {"checkpoints": reports})
    else:
        for r in reports:
            status = "complete" if r.get("complete") else f"INCOMPLETE: {r.get('error')}"
            plan = r.get("plan") or {}
            print(
                f"{r['path']}: step {r.get('step', '?')}, world size {r.get('world_size', '?')}, "
                f"plan global {plan.get('global_batch_size', '?')} = micro {plan.get('micro_batch_size', '?')} × "
                f"accumulation {plan.get('gradient_accumulation_steps', '?')} × dp {plan.get('data_parallel_size', '?')}; "
                f"{status}"
            )
    return 0 if all(r.get("complete") for r in reports) else 1
