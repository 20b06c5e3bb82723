"""`gradaccum launch`: one plan, four ways to start the workers (plus our own `local`).

    gradaccum launch --launcher torchrun --global-batch-size 32 --micro-batch-size 4 \
        --nproc-per-node 2 -- train.py --lr 0.1

Resolves the world size (nodes × processes, or the hostfile's slots), solves the plan,
writes plan.json (and deepspeed.json) into a run directory, prints the plan and the
shell-quoted command on stderr, and runs the command. `--dry-run` prints the command on
stdout, writes nothing, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

from launcher.cli.common import add_batch_args, info, plan_from_args

ORDER = 30
LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "srun", "local")
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
    p.add_argument("--launcher", required=True, choices=LAUNCHERS, help="who starts the workers")
    add_batch_args(p)
    w = p.add_argument_group("world (nodes × processes per node, or the hostfile's slots)")
    w.add_argument("--nproc-per-node", type=int, metavar="P", help="worker processes per node")
    w.add_argument("--nnodes", metavar="N", help="nodes (default 1); torchrun elastic: MIN:MAX")
    w.add_argument("--hostfile", metavar="FILE", help="deepspeed/mpirun: hosts and slots; world = sum of slots")
    w.add_argument("--include", metavar="S", help="hostfile filter, DeepSpeed syntax: worker-0@worker-1:0,2")
    w.add_argument("--exclude", metavar="S", help="hostfile filter, DeepSpeed syntax")
    r = p.add_argument_group("rendezvous")
    r.add_argument("--master-addr", metavar="HOST", help="rank 0's host (default: 127.0.0.1 or the first host)")
    r.add_argument("--master-port", type=int, metavar="PORT", help="rank 0's port (default: a free port here)")
    r.add_argument("--node-rank", type=int, metavar="R", help="torchrun static multi-node: this node's rank")
    r.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="torchrun c10d rendezvous endpoint")
    r.add_argument("--rdzv-id", metavar="ID", help="torchrun c10d rendezvous id (e.g. the Slurm job id)")
    r.add_argument("--max-restarts", type=int, metavar="K", help="torchrun: restart the workers up to K times")
    o = p.add_argument_group("launcher specifics")
    o.add_argument("--oversubscribe", action="store_true", help="mpirun: allow more ranks than cores")
    o.add_argument("--deepspeed-launcher", choices=("pdsh", "openmpi", "slurm"), help="deepspeed multi-node backend")
    o.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="deepspeed: ZeRO stage in the JSON")
    o.add_argument("--deepspeed-base", metavar="FILE", help="deepspeed: a JSON to merge (batch keys must agree)")
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


def _program(name: str, module: str | None = None) -> list[str]:
    """The launcher next to this interpreter (a venv's bin/), else on PATH, else `python -m`."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    if module:
        return [sys.executable, "-m", module]
    from launcher.errors import UserError

    raise UserError(f"`{name}` is not installed here (not beside {sys.executable}, not on PATH)")


def _script(args: argparse.Namespace) -> tuple[str, list[str]]:
    from launcher.errors import UserError

    command = list(args.script_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("no script: end the flags with `-- SCRIPT [ARGS]`, e.g. `-- train.py --lr 0.1`")
    return command[0], command[1:]


def _world(args: argparse.Namespace):
    """(world size, nnodes (low, high), filtered hostfile resources or None)."""
    from launcher.commands import parse_nnodes
    from launcher.errors import UserError
    from launcher.hostfile import apply_filters, read_hostfile

    if args.hostfile:
        if args.launcher not in ("deepspeed", "mpirun"):
            raise UserError(
                f"--hostfile is for --launcher deepspeed or mpirun; {args.launcher} takes --nnodes/--nproc-per-node"
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
    if low != high and args.launcher != "torchrun":
        raise UserError(f"elastic --nnodes {args.nnodes} is only for --launcher torchrun")
    if high > 1 and args.launcher == "local":
        raise UserError("--launcher local runs on this machine only; use torchrun, mpirun, deepspeed or srun for nodes")
    return high * args.nproc_per_node, (low, high), None


def _check_elastic(plan, low: int, high: int, per_node: int) -> None:
    from launcher.errors import UserError
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


def _env_prefix(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def _check_flags(args: argparse.Namespace) -> None:
    """Launcher-specific flags given to another launcher are mistakes, not no-ops."""
    from launcher.errors import UserError

    if args.launcher != "deepspeed" and (args.zero_stage is not None or args.deepspeed_base or args.deepspeed_launcher):
        raise UserError("--zero-stage, --deepspeed-base and --deepspeed-launcher are for --launcher deepspeed")
    if args.oversubscribe and args.launcher != "mpirun":
        raise UserError("--oversubscribe is an mpirun option")
    given = [f for f in ("node_rank", "rdzv_endpoint", "rdzv_id", "max_restarts") if getattr(args, f) is not None]
    if given and args.launcher != "torchrun":
        raise UserError(f"--{given[0].replace('_', '-')} is a torchrun option")


def _rendezvous(args: argparse.Namespace, resources, high: int) -> tuple[str, int | None, bool]:
    """(master address, master port or None, whether every host is this machine)."""
    from launcher.hostfile import validate_hostname

    hosts = list(resources) if resources else []
    single_host = not hosts or all(h in _LOCAL_NAMES or h == socket.gethostname() for h in hosts)
    master_addr = args.master_addr or ("127.0.0.1" if single_host else hosts[0])
    validate_hostname(master_addr, "--master-addr")  # it reaches every worker's environment
    port = args.master_port
    if port is not None and not 0 < port < 65536:
        from launcher.errors import UserError

        raise UserError(f"--master-port must be a TCP port (1-65535), got {port}")
    # A free port here is only right when rank 0 runs here. Static multi-node torchrun needs
    # the same port on every node (torchrun's default then); c10d has its endpoint; srun
    # workers derive the port from the Slurm job id (launcher.env).
    multi_node_torchrun = args.launcher == "torchrun" and (high > 1 or args.rdzv_endpoint)
    if port is None and not multi_node_torchrun and args.launcher != "srun":
        port = _free_port()
    return master_addr, port, single_host


def _build_argv(args, script, script_args, world, high, resources, master_addr, port, single_host, env, run_dir):
    from launcher import commands

    if args.launcher == "torchrun":
        return commands.torchrun(
            script,
            script_args,
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes or 1,
            node_rank=args.node_rank,
            master_addr=args.master_addr if not args.rdzv_endpoint else None,
            master_port=port,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id,
            max_restarts=args.max_restarts,
            program=_program("torchrun", "torch.distributed.run"),
        )
    if args.launcher == "deepspeed":
        return commands.deepspeed(
            script,
            script_args,
            hostfile=args.hostfile,
            include=args.include,
            exclude=args.exclude,
            num_nodes=None if resources or high == 1 else high,
            num_gpus=None if resources else args.nproc_per_node,
            master_addr=master_addr,
            master_port=port,
            launcher=args.deepspeed_launcher,
            single_host=single_host,
            program=_program("deepspeed"),
        )
    worker = commands.python_argv(sys.executable, script, script_args)
    if args.launcher == "mpirun":
        return commands.mpirun(
            worker,
            np=world,
            hostfile=str(run_dir / "hostfile.openmpi") if resources else None,
            procs_per_node=args.nproc_per_node if not resources and high > 1 else None,
            # -x of an unset variable only warns; forward what the workers will have.
            export=[v for v in commands.MPIRUN_EXPORTS if v in env or v in os.environ],
            allow_run_as_root=os.geteuid() == 0,
            oversubscribe=args.oversubscribe,
            program=_program("mpirun"),
        )
    if args.launcher == "srun":
        return commands.srun(worker, nodes=high, ntasks_per_node=args.nproc_per_node, program=_program("srun"))
    return worker


def run(args: argparse.Namespace) -> int:
    from launcher import commands
    from launcher.run import describe_status, format_command, run_command, run_local_workers

    _check_flags(args)
    script, script_args = _script(args)
    world, (low, high), resources = _world(args)
    plan = plan_from_args(args, world_size=world)
    if low != high:
        _check_elastic(plan, low, high, args.nproc_per_node)
    ds_config = None
    if args.launcher == "deepspeed":
        from launcher.configs import deepspeed_config, load_json_file

        base = load_json_file(args.deepspeed_base, "base DeepSpeed config") if args.deepspeed_base else None
        ds_config = deepspeed_config(plan, base, zero_stage=args.zero_stage)
    default_dir = Path("gradaccum-runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir = Path(args.run_dir or default_dir).absolute()
    master_addr, port, single_host = _rendezvous(args, resources, high)
    env = commands.worker_env(str(run_dir / "plan.json"), str(run_dir / "deepspeed.json") if ds_config else None)
    if args.launcher in ("mpirun", "local", "deepspeed") or args.master_addr:
        env["MASTER_ADDR"] = master_addr
    if port is not None and args.launcher in ("mpirun", "srun", "local", "deepspeed"):
        env["MASTER_PORT"] = str(port)
    if args.launcher == "torchrun" and args.max_restarts:
        # torch 2.13: restarted workers otherwise share the failed attempt's store and can
        # read dead workers' addresses ("Gloo connectFullMesh failed", 2 of 4 restarts here).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    argv = _build_argv(args, script, script_args, world, high, resources, master_addr, port, single_host, env, run_dir)

    info(f"gradaccum launch: {args.launcher}, world size {world}")
    info(plan.describe())
    shown = f"{_env_prefix(env)} {format_command(argv)}"
    if args.launcher == "local":
        shown = f"{args.nproc_per_node} × ({_env_prefix(env)} RANK=<0..{world - 1}> {format_command(argv)})"
    if args.dry_run:
        print(shown, flush=True)
        return 0
    if not os.path.isfile(script):
        from launcher.errors import UserError

        raise UserError(f"script {script!r} does not exist; SCRIPT is a Python file, as with torchrun")
    info(f"run directory: {run_dir}")
    info(f"command: {shown}")
    _write_run_dir(run_dir, plan, ds_config, resources if args.launcher == "mpirun" else None)
    child_env = {**os.environ, **env}
    if args.launcher == "local":
        return run_local_workers(argv, args.nproc_per_node, master_addr, port, env=child_env)
    status = run_command(argv, env=child_env)
    if status != 0:
        info(
            f"gradaccum launch: {args.launcher} ended with {describe_status(status)}; "
            "the failing rank and its exit code are in the launcher's output above"
        )
    return status


def _write_run_dir(run_dir: Path, plan, ds_config, resources) -> None:
    from launcher.atomic import write_json_atomic, write_text_atomic
    from launcher.hostfile import render_hostfile

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "plan.json", plan.to_dict())
    if ds_config is not None:
        write_json_atomic(run_dir / "deepspeed.json", ds_config)
    if resources:
        write_text_atomic(
            run_dir / "hostfile.openmpi", render_hostfile({h: len(s) for h, s in resources.items()}, "openmpi")
        )
