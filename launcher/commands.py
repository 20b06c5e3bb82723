"""Command lines for torchrun, the deepspeed launcher, mpirun and srun (pure: argv lists).

Every builder returns a `list[str]` for `launcher.run` and starts nothing. The plan
reaches the workers the same way under every launcher: `worker_env()` names the plan
JSON in $GRADACCUM_PLAN (and, for DeepSpeed, its JSON in $GRADACCUM_DEEPSPEED_CONFIG);
the launcher passes the environment on (mpirun through `-x`, the others inherit it).
Host names, ports and paths are validated here because they end up on command lines
of programs that re-parse them (ssh, pdsh, mpirun's remote daemons).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from launcher.errors import UserError
from launcher.hostfile import validate_hostname
from launcher.plan import PLAN_ENV_VAR

#: The DeepSpeed JSON rendered from the plan, for workers started by `deepspeed`.
DEEPSPEED_CONFIG_ENV_VAR = "GRADACCUM_DEEPSPEED_CONFIG"
#: Variables mpirun must forward (`-x NAME`) for workers on other nodes to find the plan
#: and the rendezvous; on the local node they are inherited anyway.
MPIRUN_EXPORTS = (PLAN_ENV_VAR, "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "PATH")
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "slurm")


class CommandError(UserError):
    """Launcher options that cannot form a working command."""


def _port(port: int | None, what: str) -> None:
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise CommandError(f"{what} must be a TCP port (1-65535), got {port!r}")


def _positive(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise CommandError(f"{what} must be a positive integer, got {value!r}")


def safe_path(path: str) -> str:
    """A path that no program will read as an option: `-x.py` becomes `./-x.py`."""
    path = str(path)
    if not path:
        raise CommandError("empty path")
    if "\n" in path or "\0" in path:
        raise CommandError(f"path {path!r} contains a newline or NUL byte")
    return f"./{path}" if path.startswith("-") else path


def parse_endpoint(endpoint: str, what: str = "--rdzv-endpoint") -> tuple[str, int]:
    """`host:port` (or `[v6::addr]:port`) -> (host, port), validated."""
    m = re.fullmatch(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p1>[0-9]+)|(?P<host>[^:\[\]]+):(?P<p2>[0-9]+)", endpoint)
    if not m:
        raise CommandError(f"{what} {endpoint!r} must be HOST:PORT (IPv6: [ADDR]:PORT)")
    host = m["v6"] or m["host"]
    port = int(m["p1"] or m["p2"])
    validate_hostname(host, what)
    _port(port, what)
    return host, port


def python_argv(python: str, script: str, script_args: Sequence[str] = ()) -> list[str]:
    """How a worker runs SCRIPT: unbuffered, so that output of ranks interleaves by line."""
    return [python, "-u", safe_path(script), *script_args]


def worker_env(
    plan_path: str,
    deepspeed_config_path: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> dict[str, str]:
    """Variables every launcher gives its workers (on top of its own RANK etc.)."""
    env = {PLAN_ENV_VAR: str(plan_path)}
    if deepspeed_config_path:
        env[DEEPSPEED_CONFIG_ENV_VAR] = str(deepspeed_config_path)
    if master_addr:
        env["MASTER_ADDR"] = validate_hostname(master_addr, "master address")
    if master_port is not None:
        _port(master_port, "master port")
        env["MASTER_PORT"] = str(master_port)
    return env


# ------------------------------------------------------------------------ torchrun
def parse_nnodes(nnodes: int | str) -> tuple[int, int]:
    """`2` -> (2, 2); `1:4` -> (1, 4) (elastic)."""
    text = str(nnodes)
    m = re.fullmatch(r"([0-9]+)(?::([0-9]+))?", text)
    if not m:
        raise CommandError(f"--nnodes {text!r} must be N or MIN:MAX")
    low, high = int(m[1]), int(m[2] or m[1])
    if low <= 0 or high < low:
        raise CommandError(f"--nnodes {text!r}: need 1 <= MIN <= MAX")
    return low, high


def torchrun(
    script: str,
    script_args: Sequence[str] = (),
    *,
    nproc_per_node: int,
    nnodes: int | str = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    rdzv_backend: str = "c10d",
    max_restarts: int | None = None,
    program: Sequence[str] = ("torchrun",),
) -> list[str]:
    """torchrun argv for one node (run it on every node of a multi-node job).

    Static rendezvous: one node, or `nnodes` > 1 with `node_rank` and `master_addr`.
    Dynamic (c10d): `rdzv_endpoint` and `rdzv_id`; needed for elastic `nnodes="MIN:MAX"`
    and convenient under Slurm, where node ranks are not known in advance.
    """
    _positive(nproc_per_node, "--nproc-per-node")
    low, high = parse_nnodes(nnodes)
    _port(master_port, "--master-port")
    argv = [*program, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node)]
    if rdzv_endpoint or rdzv_id:
        if not (rdzv_endpoint and rdzv_id):
            raise CommandError("c10d rendezvous needs both --rdzv-endpoint HOST:PORT and --rdzv-id ID")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(rdzv_id)):
            raise CommandError(f"--rdzv-id {rdzv_id!r}: use letters, digits, '_', '.', '-' (e.g. the Slurm job id)")
        if node_rank is not None or master_addr:
            raise CommandError("--node-rank / --master-addr are for static rendezvous; c10d assigns node ranks itself")
        parse_endpoint(rdzv_endpoint)
        argv += ["--rdzv-backend", rdzv_backend, "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", str(rdzv_id)]
    else:
        if low != high:
            raise CommandError(f"elastic --nnodes {nnodes} needs c10d rendezvous: give --rdzv-endpoint and --rdzv-id")
        if high > 1 and (node_rank is None or not master_addr):
            raise CommandError(
                f"--nnodes {high} with static rendezvous needs --node-rank R and --master-addr HOST "
                "(the same on every node), or c10d rendezvous with --rdzv-endpoint and --rdzv-id"
            )
        if node_rank is not None:
            if not 0 <= node_rank < high:
                raise CommandError(f"--node-rank {node_rank} must be in 0..{high - 1}")
            argv += ["--node-rank", str(node_rank)]
        argv += ["--master-addr", validate_hostname(master_addr or "127.0.0.1", "--master-addr")]
        if master_port is not None:
            argv += ["--master-port", str(master_port)]
    if max_restarts is not None:
        if max_restarts < 0:
            raise CommandError(f"--max-restarts must be >= 0, got {max_restarts}")
        argv += ["--max-restarts", str(max_restarts)]
    return [*argv, safe_path(script), *script_args]


# ----------------------------------------------------------------------- deepspeed
def deepspeed(
    script: str,
    script_args: Sequence[str] = (),
    *,
    hostfile: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    launcher: str | None = None,
    single_host: bool = False,
    program: Sequence[str] = ("deepspeed",),
) -> list[str]:
    """argv for DeepSpeed's `deepspeed` launcher (it adds `--local_rank=N` to the script).

    On a machine without GPUs it starts one process unless `num_gpus` says how many.
    `single_host`: the hostfile names only this machine; skip DeepSpeed's ssh check.
    """
    _positive(num_nodes, "--num_nodes")
    _positive(num_gpus, "--num_gpus")
    _port(master_port, "--master_port")
    if include and exclude:
        raise CommandError("--include and --exclude cannot be combined; give one of them")
    if (include or exclude) and (num_nodes or num_gpus):
        raise CommandError("DeepSpeed does not accept --num_nodes/--num_gpus together with --include/--exclude")
    if launcher is not None and launcher not in DEEPSPEED_LAUNCHERS:
        raise CommandError(f"deepspeed --launcher must be one of {', '.join(DEEPSPEED_LAUNCHERS)}, got {launcher!r}")
    argv = [*program]
    if hostfile:
        argv += ["--hostfile", safe_path(hostfile)]
        if single_host:
            argv.append("--no_ssh_check")
    if include:
        argv += ["--include", include]
    if exclude:
        argv += ["--exclude", exclude]
    if num_nodes:
        argv += ["--num_nodes", str(num_nodes)]
    if num_gpus:
        argv += ["--num_gpus", str(num_gpus)]
    if master_addr:
        # Without it and with a hostfile, DeepSpeed asks the first host over ssh.
        argv += ["--master_addr", validate_hostname(master_addr, "--master_addr")]
    if master_port is not None:
        argv += ["--master_port", str(master_port)]
    if launcher:
        argv += ["--launcher", launcher]
    return [*argv, safe_path(script), *script_args]


# -------------------------------------------------------------------------- mpirun
def mpirun(
    worker_argv: Sequence[str],
    *,
    np: int,
    hostfile: str | None = None,
    procs_per_node: int | None = None,
    export: Sequence[str] = MPIRUN_EXPORTS,
    allow_run_as_root: bool = False,
    oversubscribe: bool = False,
    program: Sequence[str] = ("mpirun",),
) -> list[str]:
    """OpenMPI mpirun argv. Ranks find rank/world in OMPI_COMM_WORLD_* (launcher.env).

    `--bind-to none`: torch runs its own thread pools; OpenMPI's default binding pins
    each rank to one core. `-x NAME` forwards NAME's value from mpirun's environment.
    """
    _positive(np, "-np")
    _positive(procs_per_node, "processes per node")
    argv = [*program]
    if allow_run_as_root:
        argv.append("--allow-run-as-root")
    argv += ["-np", str(np)]
    if hostfile:
        argv += ["--hostfile", safe_path(hostfile)]
    if procs_per_node:
        argv += ["--map-by", f"ppr:{procs_per_node}:node"]
    argv += ["--bind-to", "none"]
    if oversubscribe:
        argv.append("--oversubscribe")
    for name in export:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise CommandError(f"cannot export {name!r} with mpirun -x: not a variable name")
        argv += ["-x", name]
    return [*argv, *worker_argv]


# ---------------------------------------------------------------------------- srun
def srun(
    worker_argv: Sequence[str],
    *,
    nodes: int,
    ntasks_per_node: int,
    kill_on_bad_exit: bool = True,
    extra: Mapping[str, str] | None = None,
    program: Sequence[str] = ("srun",),
) -> list[str]:
    """srun argv: one task per worker (ranks from SLURM_PROCID, see launcher.env), or,
    with `ntasks_per_node=1` and a torchrun `worker_argv`, one torchrun per node.

    `--kill-on-bad-exit=1`: one failed task ends the step instead of leaving the others
    blocked in a collective. `extra`: more `--name=value` options (e.g. {"mpi": "pmix"}).
    """
    _positive(nodes, "--nodes")
    _positive(ntasks_per_node, "--ntasks-per-node")
    argv = [
        *program,
        f"--nodes={nodes}",
        f"--ntasks={nodes * ntasks_per_node}",
        f"--ntasks-per-node={ntasks_per_node}",
    ]
    if kill_on_bad_exit:
        argv.append("--kill-on-bad-exit=1")
    for key, value in (extra or {}).items():
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise CommandError(f"srun option {key!r} is not an option name")
        argv.append(f"--{key}={value}")
    return [*argv, *worker_argv]
