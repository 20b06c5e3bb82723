"""`gradaccum hostfile check|convert`: validate hostfiles, apply filters, change format."""

from __future__ import annotations

import argparse
import sys

from launcher.cli.common import add_json_flag, info, print_json

ORDER = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "hostfile",
        help="validate a hostfile (DeepSpeed, OpenMPI or MPICH format) or convert between formats",
        description=(
            "Hostfile formats: DeepSpeed `host slots=N`, OpenMPI `host slots=N [max_slots=M]`, "
            "MPICH `host:N`. Blank lines and # comments are ignored. Host names must be DNS names "
            "or IP addresses (they reach ssh/pdsh/mpirun command lines)."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check",
        help="validate FILE and show its hosts and slots after --include/--exclude",
        epilog="example: gradaccum hostfile check hostfiles/deepspeed.txt --include 'worker-0@worker-1:0,2' --json",
    )
    convert = actions.add_parser(
        "convert",
        help="print FILE in another format (or write it with -o)",
        epilog="example: gradaccum hostfile convert hostfiles/deepspeed.txt --to mpich",
    )
    for sub in (check, convert):
        sub.add_argument("file", metavar="FILE")
        sub.add_argument("--format", dest="fmt", choices=("auto", "deepspeed", "openmpi", "mpich"), default="auto")
        sub.add_argument("--include", metavar="S", help="keep only these hosts/slots: worker-0@worker-1:0,2")
        sub.add_argument("--exclude", metavar="S", help="drop these hosts/slots: worker-1:0")
        sub.set_defaults(func=run)
    add_json_flag(check)
    convert.add_argument("--to", required=True, choices=("deepspeed", "openmpi", "mpich"), help="output format")
    convert.add_argument("-o", "--output", metavar="FILE", help="write here (atomically) instead of stdout")


def run(args: argparse.Namespace) -> int:
    from launcher.hostfile import HostEntry, Hostfile, apply_filters, read_hostfile, render_hostfile, write_hostfile

    hostfile = read_hostfile(args.file, args.fmt)
    resources = apply_filters(hostfile.resources(), args.include, args.exclude, args.file)
    if args.action == "check":
        if args.json:
            print_json({"hosts": resources})
        else:
            total = sum(len(s) for s in resources.values())
            print(f"{args.file}: {hostfile.fmt} format, {len(resources)} host(s), {total} slot(s)")
            for host, slots in resources.items():
                print(f"  {host}  slots {','.join(map(str, slots))}")
        return 0
    # A filter that keeps some slot indices of a host keeps that many slots.
    max_slots = {e.host: e.max_slots for e in hostfile.entries}
    kept = Hostfile(tuple(HostEntry(h, len(s), max_slots[h]) for h, s in resources.items()), hostfile.source)
    if args.output:
        write_hostfile(args.output, kept, args.to)
        info(f"wrote {args.output} ({args.to} format)")
    else:
        sys.stdout.write(render_hostfile(kept, args.to))
    return 0
