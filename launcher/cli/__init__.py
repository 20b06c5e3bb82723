"""`gradaccum` command line: argument parsing only; the work is in the modules it calls.

Each sub-command lives in its own module of this package with a `register(subparsers)`
function and an `ORDER` for `--help`; modules are found by listing the package, so
adding a command touches no other file. No module here may import torch at import time.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from launcher.errors import UserError

_NOT_COMMANDS = {"common"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradaccum",
        description=(
            "Plan, launch and verify data-parallel training with gradient accumulation: "
            "global batch = micro batch × accumulation steps × data-parallel size."
        ),
        epilog="Run `gradaccum COMMAND --help` for the flags of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    modules = []
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_COMMANDS and not info.name.startswith("_"):
            modules.append(importlib.import_module(f"{__name__}.{info.name}"))
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"gradaccum {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradaccum: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())
