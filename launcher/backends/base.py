"""What every launcher backend is: the base class, the launch it is given, shared checks.

A backend is one class that knows one launcher (torchrun, deepspeed, ...) end to end:
the flags only it takes, the argv that starts the workers (`argv`), the variables the
workers get (`env`), extra files in the run directory (`run_files`), how it runs the
command (`start`), and, where it can run inside an sbatch script, its block of that
script (`sbatch_block`). `gradaccum launch` and `gradaccum slurm` ask the registry in
`launcher.backends` for the class and call these methods; they hold no per-launcher `if`.

Pure apart from `start`: argv lists, dicts and text. Torch-free. Host names, ports and
paths are validated here because they end up on command lines of programs that re-parse
them (ssh, pdsh, mpirun's remote daemons).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from launcher.errors import UserError
from launcher.hostfile import validate_hostname
from launcher.plan import PLAN_ENV_VAR

if TYPE_CHECKING:
    from launcher.plan import BatchPlan
    from launcher.slurm import SlurmJob

#: The DeepSpeed JSON rendered from the plan, for workers started by `deepspeed`.
DEEPSPEED_CONFIG_ENV_VAR = "GRADACCUM_DEEPSPEED_CONFIG"


class CommandError(UserError):
    """Launcher options that cannot form a working command."""


class JobValue(str):
    """A value known only inside the Slurm job, written as shell text: `"$SLURM_NNODES"`.

    Builders take it in place of a literal (a node count, an endpoint, a job id), skip the
    checks they make of literals, and the sbatch renderer writes it unquoted.
    """


def sh(argv: Sequence[str]) -> str:
    """argv as shell text: words quoted, JobValues written as they are."""
    return " ".join(a if isinstance(a, JobValue) else shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------- checks
def check_port(port: int | None, what: str) -> None:
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise CommandError(f"{what} must be a TCP port (1-65535), got {port!r}")


def check_positive(value: int | None, what: str) -> None:
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
    check_port(port, what)
    return host, port


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
        check_port(master_port, "master port")
        env["MASTER_PORT"] = str(master_port)
    return env


# ------------------------------------------------------------------- the backend
@dataclasses.dataclass(frozen=True)
class Flag:
    """A `gradaccum launch` option that belongs to one launcher (argparse arguments)."""

    name: str  # "--node-rank"
    kwargs: Mapping[str, Any]  # type=, choices=, action=, metavar=, help=
    group: str = "launcher specifics"

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class RunFile:
    """A file `gradaccum launch` writes into the run directory next to plan.json."""

    name: str
    content: str | dict  # a dict is written as JSON
    env_var: str | None = None  # the variable that names it for the workers


@dataclasses.dataclass(frozen=True)
class Launch:
    """What `gradaccum launch` resolved, the same for every launcher."""

    script: str
    script_args: tuple[str, ...]
    world_size: int
    nodes: tuple[int, int]  # (min, max); equal unless elastic
    nnodes: str | None  # --nnodes as given ("1:4" stays "1:4")
    nproc_per_node: int | None  # None with a hostfile (its slots decide)
    hostfile: str | None
    include: str | None
    exclude: str | None
    hosts: Mapping[str, Sequence[int]] | None  # the hostfile's hosts and slots, filtered
    master_addr: str  # resolved: --master-addr, else 127.0.0.1 or the first host
    master_addr_given: bool
    master_port: int | None
    single_host: bool  # every host is this machine
    run_dir: Path
    python: str
    options: Mapping[str, Any]  # this launcher's own flags (Flag.dest -> value)


def program(name: str, module: str | None = None, python: str | None = None) -> list[str]:
    """The launcher next to `python` (a venv's bin/), else on PATH, else `python -m MODULE`."""
    python = python or sys.executable
    beside = Path(python).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    if module:
        return [python, "-m", module]
    raise UserError(f"`{name}` is not installed here (not beside {python}, not on PATH)")


class Backend:
    """One launcher. Subclasses set the class attributes and override what differs."""

    #: the name users give (`--launcher NAME`, `--launch NAME`)
    name: ClassVar[str]
    #: one line for --help
    description: ClassVar[str]
    #: options only this launcher takes; given to another launcher they are an error
    flags: ClassVar[tuple[Flag, ...]] = ()
    #: it reads a hostfile (deepspeed, mpirun); the others take --nnodes/--nproc-per-node
    takes_hostfile: ClassVar[bool] = False
    #: it can start workers on other nodes
    multi_node: ClassVar[bool] = True
    #: it accepts an elastic --nnodes MIN:MAX
    elastic: ClassVar[bool] = False
    #: the workers get MASTER_ADDR / MASTER_PORT from us (torchrun sets its own)
    exports_master_addr: ClassVar[bool] = True
    exports_master_port: ClassVar[bool] = True
    #: how the sbatch script starts the workers (None: not inside sbatch scripts)
    sbatch_description: ClassVar[str | None] = None

    # ------------------------------------------------------------ gradaccum launch
    def picks_free_port(self, launch: Launch) -> bool:
        """Whether a free port here is the right MASTER_PORT when none is given (rank 0 runs here)."""
        return True

    def run_files(self, plan: BatchPlan, launch: Launch) -> list[RunFile]:
        """Files beside plan.json in the run directory (pure: computed also for --dry-run)."""
        return []

    def env(self, launch: Launch, files: Sequence[RunFile]) -> dict[str, str]:
        """Variables the workers get on top of the inherited environment."""
        env = worker_env(str(launch.run_dir / "plan.json"))
        for f in files:
            if f.env_var:
                env[f.env_var] = str(launch.run_dir / f.name)
        if self.exports_master_addr or launch.master_addr_given:
            env["MASTER_ADDR"] = launch.master_addr
        if launch.master_port is not None and self.exports_master_port:
            env["MASTER_PORT"] = str(launch.master_port)
        return env

    def argv(self, launch: Launch, env: Mapping[str, str]) -> list[str]:
        raise NotImplementedError

    def describe(self, launch: Launch, env: Mapping[str, str], argv: Sequence[str]) -> str:
        """The command as `--dry-run` prints it: the variables, then the argv, shell-quoted."""
        return f"{format_env(env)} {shlex.join(argv)}"

    def start(self, launch: Launch, argv: Sequence[str], env: Mapping[str, str]) -> int:
        """Run the command with `env` (the complete environment); its exit status."""
        from launcher.run import describe_status, run_command

        status = run_command(argv, env=env)
        if status != 0:
            print(
                f"gradaccum launch: {self.name} ended with {describe_status(status)}; "
                "the failing rank and its exit code are in the launcher's output above",
                file=sys.stderr,
                flush=True,
            )
        return status

    # -------------------------------------------------------------- gradaccum slurm
    def sbatch_tasks_per_node(self, job: SlurmJob) -> int:
        """Slurm tasks per node of the job (one per process unless the launcher forks them)."""
        return job.nproc_per_node

    def sbatch_block(self, job: SlurmJob, plan: BatchPlan, script: str, script_args: Sequence[str]) -> str:
        """The lines of the sbatch script that start the workers (run in the background)."""
        raise NotImplementedError(f"{self.name} cannot start workers inside an sbatch script")


def format_env(env: Mapping[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
