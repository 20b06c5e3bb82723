"""`gradaccum launch`: one plan, four ways to start the workers (plus our own `local`).

    gradaccum launch --launcher torchrun --global-batch-size 32 --micro-batch-size 4 \
        --nproc-per-node 2 -- train.py --lr 0.1

Resolves the world size (nodes × processes, or the hostfile's slots), solves the plan,
writes plan.json (and the launcher's files, e.g. deepspeed.json) into a run directory,
prints the plan and the shell-quoted command on stderr, and runs it. `--dry-run` prints
the command on stdout, writes nothing, and exits 0. What differs per launcher (its flags,
argv, environment, files, how it runs) is asked of its backend in `launcher.backends`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from launcher.atomic import make_dir
from launcher.backends import LAUNCHERS
from launcher.backends.base import check_port
from launcher.cli.common import add_batch_args, info, plan_from_args
from launcher.errors import UserError

ORDER = 30
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch",
        help="start SCRIPT on every worker with torchrun, deepspeed, mpirun, srun or locally",
        description=(
            "Solve the batch plan for the world size of the launch, hand it to every worker "
            "($GRADACCUM_PLAN names the plan JSON; $GRADACCUM_DEEPSPEED_CONFIG the DeepSpeed JSON "
            "under --launcher deepspeed), print the command and run it. Exits with the launch's status."
        ),
        epilog=(
            "examples:\n"
            "  gradaccum launch --launcher torchrun --global-batch-size 32 --micro-batch-size 4 "
            "--nproc-per-node 2 -- train.py\n"
            "  gradaccum launch --launcher mpirun --global-batch-size 32 --micro-batch-size 4 "
            "--hostfile hosts.txt -- train.py\n"
            "  gradaccum launch --launcher deepspeed --global-batch-size 32 --micro-batch-size 4 "
            "--nproc-per-node 2 -- train.py"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--launcher",
        required=True,
        choices=tuple(LAUNCHERS),
        help="who starts the workers: " + "; ".join(f"{n}: {b.description}" for n, b in LAUNCHERS.items()),
    )
    add_batch_args(p)
    w = p.add_argument_group("world (nodes × processes per node, or the hostfile's slots)")
    w.add_argument("--nproc-per-node", type=int, metavar="P", help="worker processes per node")
    w.add_argument("--nnodes", metavar="N", help="nodes (default 1); torchrun elastic: MIN:MAX")
    hostfile_users = "/".join(n for n, b in LAUNCHERS.items() if b.takes_hostfile)
    w.add_argument("--hostfile", metavar="FILE", help=f"{hostfile_users}: hosts and slots; world = sum of slots")
    w.add_argument("--include", metavar="S", help="hostfile filter, DeepSpeed syntax: worker-0@worker-1:0,2")
    w.add_argument("--exclude", metavar="S", help="hostfile filter, DeepSpeed syntax")
    groups = {"rendezvous": p.add_argument_group("rendezvous")}
    groups["rendezvous"].add_argument(
        "--master-addr", metavar="HOST", help="rank 0's host (default: 127.0.0.1 or the first host)"
    )
    groups["rendezvous"].add_argument(
        "--master-port", type=int, metavar="PORT", help="rank 0's port (default: a free port here)"
    )
    for cls in LAUNCHERS.values():
        for flag in cls.flags:
            if flag.group not in groups:
                groups[flag.group] = p.add_argument_group(flag.group)
            groups[flag.group].add_argument(flag.name, **flag.kwargs)
    p.add_argument("--run-dir", metavar="DIR", help="where plan.json goes (default ./gradaccum-runs/TIME-PID)")
    p.add_argument("--dry-run", action="store_true", help="print the command on stdout and exit 0; write nothing")
    p.add_argument(
        "script_command", nargs=argparse.REMAINDER, metavar="-- SCRIPT ARGS", help="the Python script and its args"
    )
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(args: argparse.Namespace) -> tuple[str, list[str]]:
    command = list(args.script_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("no script: end the flags with `-- SCRIPT [ARGS]`, e.g. `-- train.py --lr 0.1`")
    return command[0], command[1:]


def _names(predicate) -> str:
    """`a, b or c`: the launchers for which `predicate(backend class)` holds."""
    names = [n for n, b in LAUNCHERS.items() if predicate(b)]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _world(args: argparse.Namespace, backend):
    """(world size, nnodes (low, high), filtered hostfile resources or None)."""
    from launcher.backends.base import parse_nnodes
    from launcher.hostfile import apply_filters, read_hostfile

    if args.hostfile:
        if not backend.takes_hostfile:
            raise UserError(
                f"--hostfile is for --launcher {_names(lambda b: b.takes_hostfile)}; "
                f"{args.launcher} takes --nnodes/--nproc-per-node"
            )
        if args.nproc_per_node is not None:
            raise UserError("with --hostfile the slots decide the processes per host; drop --nproc-per-node")
        hostfile = read_hostfile(args.hostfile)
        resources = apply_filters(hostfile.resources(), args.include, args.exclude, args.hostfile)
        if args.nnodes is not None and parse_nnodes(args.nnodes) != (len(resources), len(resources)):
            raise UserError(f"--nnodes {args.nnodes} but the hostfile (after filters) has {len(resources)} host(s)")
        return sum(len(s) for s in resources.values()), (len(resources), len(resources)), resources
    if args.include or args.exclude:
        raise UserError("--include/--exclude filter a --hostfile; give one")
    if args.nproc_per_node is None:
        raise UserError("the world size is required: give --nproc-per-node P (and --nnodes N), or --hostfile FILE")
    if args.nproc_per_node <= 0:
        raise UserError(f"--nproc-per-node must be a positive integer, got {args.nproc_per_node}")
    low, high = parse_nnodes(args.nnodes or 1)
    if low != high and not backend.elastic:
        raise UserError(f"elastic --nnodes {args.nnodes} is only for --launcher {_names(lambda b: b.elastic)}")
    if high > 1 and not backend.multi_node:
        raise UserError(
            f"--launcher {args.launcher} runs on this machine only; use {_names(lambda b: b.multi_node)} for nodes"
        )
    return high * args.nproc_per_node, (low, high), None


def _check_elastic(plan, low: int, high: int, per_node: int) -> None:
    from launcher.plan import PlanError

    bad = []
    for nodes in range(low, high):
        try:
            plan.with_world_size(nodes * per_node)
        except PlanError:
            bad.append(nodes)
    if bad:
        raise UserError(
            f"global batch {plan.global_batch_size} cannot be kept with {', '.join(map(str, bad))} node(s) of "
            f"{per_node} processes (elastic --nnodes {low}:{high}); choose a global batch divisible by every "
            "data-parallel size in the range"
        )


def _options(args: argparse.Namespace) -> dict:
    """The chosen launcher's own flags; another launcher's flag, given, is a mistake, not a no-op."""
    for name, cls in LAUNCHERS.items():
        if name == args.launcher:
            continue
        for flag in cls.flags:
            value = getattr(args, flag.dest)
            if value is not None and value is not False:
                raise UserError(f"{flag.name} is a {name} option: it is for --launcher {name} only")
    return {flag.dest: getattr(args, flag.dest) for flag in LAUNCHERS[args.launcher].flags}


def _rendezvous(args: argparse.Namespace, resources) -> tuple[str, bool]:
    """(master address, whether every host is this machine)."""
    from launcher.hostfile import validate_hostname

    hosts = list(resources) if resources else []
    single_host = not hosts or all(h in _LOCAL_NAMES or h == socket.gethostname() for h in hosts)
    master_addr = args.master_addr or ("127.0.0.1" if single_host else hosts[0])
    validate_hostname(master_addr, "--master-addr")  # it reaches every worker's environment
    check_port(args.master_port, "--master-port")
    return master_addr, single_host


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from launcher.backends import backend as get_backend
    from launcher.backends.base import Launch

    backend = get_backend(args.launcher)
    options = _options(args)
    script, script_args = _script(args)
    world, (low, high), resources = _world(args, backend)
    plan = plan_from_args(args, world_size=world)
    if low != high:
        _check_elastic(plan, low, high, args.nproc_per_node)
    default_dir = Path("gradaccum-runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    master_addr, single_host = _rendezvous(args, resources)
    launch = Launch(
        script=script,
        script_args=tuple(script_args),
        world_size=world,
        nodes=(low, high),
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        hostfile=args.hostfile,
        include=args.include,
        exclude=args.exclude,
        hosts=resources,
        master_addr=master_addr,
        master_addr_given=bool(args.master_addr),
        master_port=args.master_port,
        single_host=single_host,
        run_dir=Path(args.run_dir or default_dir).absolute(),
        python=sys.executable,
        options=options,
    )
    files = backend.run_files(plan, launch)
    # A free port here is only right when rank 0 runs here; the backend says when.
    if launch.master_port is None and backend.picks_free_port(launch):
        launch = dataclasses.replace(launch, master_port=_free_port())
    env = backend.env(launch, files)
    argv = backend.argv(launch, env)

    info(f"gradaccum launch: {args.launcher}, world size {world}")
    info(plan.describe())
    shown = backend.describe(launch, env, argv)
    if args.dry_run:
        print(shown, flush=True)
        needed = ", ".join(str(launch.run_dir / name) for name in ["plan.json", *(f.name for f in files)])
        info(
            f"gradaccum launch: --dry-run wrote nothing; the command reads {needed}, which "
            "`gradaccum launch` without --dry-run writes before starting it (same --run-dir to reuse the path)"
        )
        return 0
    if os.path.isdir(script):
        raise UserError(f"script {script!r} is a directory; SCRIPT is a Python file, as with torchrun")
    if not os.path.isfile(script):
        raise UserError(f"script {script!r} does not exist; SCRIPT is a Python file, as with torchrun")
    info(f"run directory: {launch.run_dir}")
    info(f"command: {shown}")
    _write_run_dir(launch.run_dir, plan, files)
    return backend.start(launch, argv, {**os.environ, **env})


def _write_run_dir(run_dir: Path, plan, files) -> None:
    from launcher.atomic import write_json_atomic, write_text_atomic

    make_dir(run_dir, "run directory")
    write_json_atomic(run_dir / "plan.json", plan.to_dict())
    for f in files:
        if isinstance(f.content, dict):
            write_json_atomic(run_dir / f.name, f.content)
        else:
            write_text_atomic(run_dir / f.name, f.content)
