"""Which launcher started this process, and where this process sits in the job.

`detect()` reads the environment (never writes it) and returns one frozen `ClusterEnv`.
Each launcher is one row of a table of variable names; rows are tried in the order of
`DETECTION_ORDER`. `export_torch_distributed_env()` is the one function that writes
the variables `torch.distributed.init_process_group(init_method="env://")` reads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

from launcher.errors import UserError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
#: Slurm and OpenMPI jobs without MASTER_PORT derive their port from the job id, so that
#: two jobs sharing a node do not collide: SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
#: (ports 20000-29999, below the Linux ephemeral range that starts at 32768).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

#: Set next to the torch.distributed variables by the `local` launcher and by
#: export_torch_distributed_env(): the name of the launcher that really started us.
LAUNCHER_ENV_VAR = "GRADACCUM_LAUNCHER"

#: Environment variables that show an MPI runtime started us even when no table row
#: matches (e.g. `srun --mpi=pmix` sets PMIX_RANK but no OMPI_COMM_WORLD_*).
MPI_RUNTIME_HINTS = ("PMIX_RANK", "PMI_FD", "PMI_PORT", "OMPI_MCA_orte_hnp_uri", "HYDRA_CONTROL_FD")


class EnvError(UserError):
    """The environment is inconsistent or lacks what a distributed run needs."""


@dataclasses.dataclass(frozen=True)
class ClusterEnv:
    """Where this process sits: rank among all, rank on its node, the rendezvous address."""

    launcher: str | None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    hosts: tuple[str, ...] = ()
    restart_count: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise EnvError(f"{self.launcher}: rank {self.rank} is outside world size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise EnvError(
                f"{self.launcher}: local rank {self.local_rank} is outside local world size {self.local_world_size}"
            )
        if self.local_world_size > self.world_size:
            raise EnvError(
                f"{self.launcher}: local world size {self.local_world_size} exceeds world size {self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            raise EnvError(f"{self.launcher}: master port {self.master_port} is not a TCP port (1-65535)")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hosts"] = list(self.hosts)
        return out


@dataclasses.dataclass(frozen=True)
class _Row:
    """One launcher: the variables it sets. `marker` must be present for the row to match."""

    name: str
    marker: tuple[str, ...]
    rank: str
    world_size: str
    local_rank: str | None = None
    local_world_size: str | None = None
    node_rank: str | None = None
    restart_count: str | None = None
    #: a variable whose *value* names the launcher (the `local` launcher sets one)
    name_from: str | None = None
    #: a per-job number to derive the default port from (two jobs on a node must differ)
    job_id: str | None = None


# Order matters: the innermost launcher must win, because outer launchers' variables
# leak into the processes that inner ones start.
#  1. torch-style variables (RANK, WORLD_SIZE ...) are set per process by whatever
#     spawned this very process (torchrun, the deepspeed launcher, `gradaccum launch
#     --launcher local`, or our own export), even when that launcher itself runs under mpirun or srun.
#     Among them the rows with a more specific marker come first.
#  2. OpenMPI, then MPICH/Intel MPI: `mpirun` inside an sbatch job leaves the batch
#     step's SLURM_PROCID=0 in every rank (measured), so MPI must win over Slurm.
#  3. Slurm (srun tasks, or the batch step itself as one process).
#  4. mpi4py, only when an MPI runtime is visible but sets none of the variables above.
#  5. a single process.
_TORCH = dict(
    rank="RANK",
    world_size="WORLD_SIZE",
    local_rank="LOCAL_RANK",
    local_world_size="LOCAL_WORLD_SIZE",
    node_rank="GROUP_RANK",
)
ROWS: tuple[_Row, ...] = (
    _Row(
        "torchrun", ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"), restart_count="TORCHELASTIC_RESTART_COUNT", **_TORCH
    ),
    _Row(
        "deepspeed",
        ("CROSS_RANK", "RANK", "WORLD_SIZE"),
        rank="RANK",
        world_size="WORLD_SIZE",
        local_rank="LOCAL_RANK",
        local_world_size="LOCAL_SIZE",
        node_rank="CROSS_RANK",
    ),
    # `gradaccum launch --launcher local` and export_torch_distributed_env() name the
    # launcher in GRADACCUM_LAUNCHER, so that detecting again after an export still
    # says who started us.
    _Row("gradaccum", (LAUNCHER_ENV_VAR, "RANK", "WORLD_SIZE"), name_from=LAUNCHER_ENV_VAR, **_TORCH),
    _Row("env", ("RANK", "WORLD_SIZE"), **_TORCH),
    _Row(
        "openmpi",
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        rank="OMPI_COMM_WORLD_RANK",
        world_size="OMPI_COMM_WORLD_SIZE",
        local_rank="OMPI_COMM_WORLD_LOCAL_RANK",
        local_world_size="OMPI_COMM_WORLD_LOCAL_SIZE",
        # Not OMPI_COMM_WORLD_NODE_RANK: despite its name it is the process's rank among
        # all processes on its node (measured: 1 for rank 1 of `mpirun -np 2` on one
        # host), not the node's index. The node index is rank // local size (by-slot).
        job_id="OMPI_MCA_ess_base_jobid",
    ),
    _Row(
        "mpich",
        ("PMI_RANK", "PMI_SIZE"),
        rank="PMI_RANK",
        world_size="PMI_SIZE",
        local_rank="MPI_LOCALRANKID",
        local_world_size="MPI_LOCALNRANKS",
    ),
)
DETECTION_ORDER = (*(row.name for row in ROWS), "slurm", "mpi4py", None)


def _int(environ: Mapping[str, str], var: str, launcher: str, minimum: int = 0) -> int:
    """The integer in `var`; every number read from the environment comes through here, so
    a non-number or an out-of-range one (WORLD_SIZE=0, a negative rank) is one EnvError."""
    value = environ[var]
    try:
        number = int(value)
    except ValueError:
        raise EnvError(f"{launcher}: {var}={value!r} is not an integer") from None
    if number < minimum:
        raise EnvError(f"{launcher}: {var}={value!r} must be at least {minimum}")
    return number


def _opt_int(environ: Mapping[str, str], var: str | None, launcher: str, default: int, minimum: int = 0) -> int:
    return _int(environ, var, launcher, minimum) if var and environ.get(var, "") != "" else default


def _is_set(environ: Mapping[str, str], var: str | None) -> bool:
    return bool(var) and environ.get(var, "") != ""


def _check_half_set(environ: Mapping[str, str]) -> None:
    """No row matched: refuse a row with its global rank but not its world size, or the reverse.

    `RANK` without `WORLD_SIZE`, `PMI_RANK` without `PMI_SIZE`, or a local rank and a
    size without the global rank mean a launcher (or a user) left the job half
    described; reading that as a single process would silently train alone.
    """
    for row in ROWS:
        named = (row.rank, row.world_size, row.local_rank, row.local_world_size)
        present = [var for var in dict.fromkeys(named) if _is_set(environ, var)]
        missing = [var for var in (row.rank, row.world_size) if not _is_set(environ, var)]
        # Only local variables (no global rank or size) are not a half-set launch: under
        # `srun --mpi=pmix` the MPI library answers them (the mpi4py fallback below).
        if len(missing) == 1:
            raise EnvError(
                f"{' and '.join(present)} {'is' if len(present) == 1 else 'are'} set but "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; a launcher sets "
                f"{row.rank} and {row.world_size} together: set {' and '.join(missing)} too, or unset "
                f"{' and '.join(present)} to run as a single process"
            )


def _master(environ: Mapping[str, str], hosts: tuple[str, ...], default_port: int) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT when set; else the first host of the job; else loopback."""
    addr = environ.get("MASTER_ADDR") or (hosts[0] if hosts else DEFAULT_MASTER_ADDR)
    port = default_port
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", "MASTER_PORT")
    return addr, port


def _slurm_hosts(environ: Mapping[str, str]) -> tuple[str, ...]:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    return tuple(expand_nodelist(nodelist, environ)) if nodelist else ()


def _port_from_job(job: str | None) -> int | None:
    return SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN if job and job.isdigit() else None


def _slurm_port(environ: Mapping[str, str]) -> int:
    return _port_from_job(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")) or DEFAULT_MASTER_PORT


def _from_row(row: _Row, environ: Mapping[str, str]) -> ClusterEnv:
    name = environ[row.name_from] if row.name_from else row.name
    world = _int(environ, row.world_size, name, minimum=1)
    rank = _int(environ, row.rank, name)
    # Under mpirun inside an sbatch job the Slurm node list is still the job's hosts.
    hosts = _slurm_hosts(environ) if "SLURM_JOB_ID" in environ else ()
    # The innermost job id decides the default port: two mpiruns in one Slurm job differ.
    port = _port_from_job(environ.get(row.job_id)) if row.job_id else None
    addr, port = _master(environ, hosts, port or _slurm_port(environ))
    local_world = _opt_int(environ, row.local_world_size, name, world, minimum=1)
    return ClusterEnv(
        launcher=name,
        rank=rank,
        local_rank=_opt_int(environ, row.local_rank, name, rank % local_world),
        world_size=world,
        local_world_size=local_world,
        node_rank=_opt_int(environ, row.node_rank, name, rank // local_world),
        master_addr=addr,
        master_port=port,
        hosts=hosts,
        restart_count=_opt_int(environ, row.restart_count, name, 0),
    )


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE format: `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"([0-9]+)(?:\(x([0-9]+)\))?", part.strip())
        if not m:
            raise EnvError(f"cannot parse Slurm tasks-per-node {spec!r} (expected e.g. `2(x3),1`)")
        out.extend([int(m[1])] * int(m[2] or 1))
    return out


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    # srun sets SLURM_STEP_ID in each task; the batch step (and an salloc shell) has none.
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    return step is not None and step.isdigit() and int(step) < 0xFFFFFFF0


def _from_slurm(environ: Mapping[str, str]) -> ClusterEnv:
    hosts = _slurm_hosts(environ)
    addr, port = _master(environ, hosts, _slurm_port(environ))
    restart = _opt_int(environ, "SLURM_RESTART_COUNT", "slurm", 0)
    if not _in_slurm_step(environ):
        # The batch script is one process, however many tasks the job asked for.
        return ClusterEnv("slurm", master_addr=addr, master_port=port, hosts=hosts, restart_count=restart)
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world = _opt_int(environ, world_var, "slurm", 1, minimum=1)
    node_rank = _opt_int(environ, "SLURM_NODEID", "slurm", 0)
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE", "slurm", minimum=1)
    else:
        spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
        counts = tasks_per_node(spec) if spec else [world]
        if node_rank >= len(counts):
            raise EnvError(f"slurm: SLURM_NODEID={node_rank} but tasks per node {spec!r} lists {len(counts)} nodes")
        local_world = counts[node_rank]
    return ClusterEnv(
        launcher="slurm",
        rank=_int(environ, "SLURM_PROCID", "slurm"),
        local_rank=_opt_int(environ, "SLURM_LOCALID", "slurm", 0),
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        hosts=hosts,
        restart_count=restart,
    )


def _from_mpi4py(environ: Mapping[str, str]) -> ClusterEnv | None:
    """Ask the MPI library itself; only called when an MPI runtime is visible."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    # Split_type is collective: every rank that calls detect() takes part.
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        rank, world, local_rank, local_world = comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size()
    finally:
        local.Free()
    addr, port = _master(environ, (), DEFAULT_MASTER_PORT)
    return ClusterEnv(
        launcher="mpi4py",
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=rank // local_world,
        master_addr=addr,
        master_port=port,
    )


def detect(environ: Mapping[str, str] | None = None, use_mpi4py: bool = True) -> ClusterEnv:
    """Who started this process, tried in DETECTION_ORDER. Reads, never writes, `environ`."""
    environ = os.environ if environ is None else environ
    for row in ROWS:
        if all(environ.get(var, "") != "" for var in row.marker):
            return _from_row(row, environ)
    _check_half_set(environ)
    if environ.get("SLURM_PROCID") is not None and environ.get("SLURM_JOB_ID"):
        return _from_slurm(environ)
    if use_mpi4py and any(var in environ for var in MPI_RUNTIME_HINTS):
        found = _from_mpi4py(environ)
        if found is not None:
            return found
    addr, port = _master(environ, (), DEFAULT_MASTER_PORT)
    return ClusterEnv(None, master_addr=addr, master_port=port)


# ------------------------------------------------------------------ node lists
def expand_nodelist(nodelist: str, environ: Mapping[str, str] | None = None, method: str = "auto") -> list[str]:
    """Expand a Slurm node list (`node[01-03,7]`) into host names, in Slurm's order.

    `method`: "scontrol" (Slurm itself; needs a slurm.conf), "hostlist" (the
    python-hostlist library), or "auto" (scontrol when Slurm is configured here).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        return []
    if nodelist.startswith("-"):
        raise EnvError(f"node list {nodelist!r} starts with '-': refusing to pass it to scontrol")
    nodelist = _normalise_nodelist(nodelist)
    environ = os.environ if environ is None else environ
    if method == "auto":
        method = "scontrol" if slurm_configured(environ) else "hostlist"
    if method == "scontrol":
        return _expand_scontrol(nodelist, environ)
    if method == "hostlist":
        return _expand_hostlist(nodelist)
    raise ValueError(f"unknown nodelist expansion method {method!r}")


def _normalise_nodelist(nodelist: str) -> str:
    """Check the brackets and drop whitespace next to a comma inside them.

    `1.2.3.[089, 100-110]` is read as `1.2.3.[089,100-110]` (first host 1.2.3.089), as
    Lightning reads it; scontrol would pad the ` 100` and python-hostlist would split the
    list at the space. Each error names the bracket or space at fault; scontrol prints
    garbage for unbalanced lists (`n[1-2` -> `n]`) and still exits 0, so they never reach it.
    """
    out: list[str] = []
    depth = 0
    for i, c in enumerate(nodelist):
        if c == "[":
            if depth:
                raise EnvError(f"node list {nodelist!r} nests a '[' inside brackets (offset {i})")
            depth = 1
        elif c == "]":
            if not depth:
                raise EnvError(f"node list {nodelist!r} has a ']' with no '[' before it (offset {i})")
            depth = 0
        elif c.isspace() and depth:
            if (out and out[-1] == ",") or nodelist[i:].lstrip()[:1] == ",":
                continue
            raise EnvError(
                f"node list {nodelist!r} has a space inside brackets (offset {i}) that does not follow a comma"
            )
        out.append(c)
    if depth:
        raise EnvError(f"node list {nodelist!r} opens a '[' that is never closed")
    return "".join(out)


def slurm_configured(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    conf = environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    return shutil.which("scontrol") is not None and os.path.isfile(conf)


def _expand_scontrol(nodelist: str, environ: Mapping[str, str]) -> list[str]:
    from launcher.run import capture_command

    env = dict(os.environ)
    if environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = environ["SLURM_CONF"]
    result = capture_command(["scontrol", "show", "hostnames", nodelist], env=env, timeout=30)
    hosts = result.stdout.split()
    # scontrol exits 0 for an invalid list: the complaint is on stderr, stdout is empty.
    if result.returncode != 0 or not hosts or result.stderr.strip():
        why = result.stderr.strip() or f"exit status {result.returncode}, no output"
        raise EnvError(f"scontrol cannot expand node list {nodelist!r}: {why}")
    return hosts


def _expand_hostlist(nodelist: str) -> list[str]:
    import hostlist

    hosts: list[str] = []
    # Slurm also accepts spaces between lists; python-hostlist would keep them in a name.
    for part in nodelist.split():
        try:
            hosts.extend(hostlist.expand_hostlist(part, allow_duplicates=True))
        except hostlist.BadHostlist as e:
            raise EnvError(f"cannot expand node list {nodelist!r}: {e}") from None
    return hosts


# ----------------------------------------------------------- torch.distributed
def torch_distributed_env(cluster_env: ClusterEnv) -> dict[str, str]:
    """The variables `init_process_group(init_method="env://")` reads, for this process."""
    return {
        "RANK": str(cluster_env.rank),
        "WORLD_SIZE": str(cluster_env.world_size),
        "LOCAL_RANK": str(cluster_env.local_rank),
        "LOCAL_WORLD_SIZE": str(cluster_env.local_world_size),
        "MASTER_ADDR": cluster_env.master_addr,
        "MASTER_PORT": str(cluster_env.master_port),
    }


def export_torch_distributed_env(environ: MutableMapping[str, str] | None = None) -> ClusterEnv:
    """Detect, then write the torch.distributed variables into `environ` (default os.environ).

    The one function here with a side effect; trainers call it once before
    `init_process_group`, so that a script under mpirun or srun needs no WORLD_SIZE.
    """
    environ = os.environ if environ is None else environ
    found = detect(environ)
    spans_nodes = found.world_size > found.local_world_size
    if spans_nodes and found.master_addr in ("127.0.0.1", "localhost") and not environ.get("MASTER_ADDR"):
        raise EnvError(
            f"{found.launcher}: {found.world_size} processes span several nodes but no master address is known; "
            "set MASTER_ADDR (and MASTER_PORT) to the first node's address and export it to every rank "
            "(mpirun: -x MASTER_ADDR=HOST -x MASTER_PORT=PORT)"
        )
    environ.update(torch_distributed_env(found))
    if found.launcher:
        environ[LAUNCHER_ENV_VAR] = found.launcher
    return found


def main() -> None:  # pragma: no cover - debugging aid: python -m launcher.env
    import json

    json.dump(detect().to_dict(), sys.stdout, indent=2)
    print()


if __name__ == "__main__":  # pragma: no cover
    main()
