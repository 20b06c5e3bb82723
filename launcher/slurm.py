"""Slurm: sbatch scripts rendered from the plan; submit, status, cancel through Slurm's own CLI.

`render_sbatch` is pure (the job's frame from `slurm/templates/job.sbatch.in`, the block
that starts the workers from the launcher's backend in `launcher.backends`; pinned by
golden files). The launchers that can run inside the job (`--launch`):

  srun       one srun task per process; ranks from SLURM_PROCID/SLURM_LOCALID (launcher.env)
  torchrun   one srun task per node running torchrun, c10d rendezvous at the first node
  deepspeed  `deepspeed --launcher slurm`, which runs srun itself from the batch node

Everything that talks to Slurm goes through `launcher.run.capture_command`: `submit`
(sbatch --parsable), `job_info` / `wait_for_job` (scontrol show job), `cancel` (scancel),
`requeue_current_job` (scontrol requeue: rank 0 of a pre-empted run calls it after its
checkpoint). `launcher/slurm_job.py` holds the helpers the rendered script runs inside the job.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launcher.backends import LAUNCHERS, sbatch_launchers
from launcher.errors import UserError
from launcher.plan import BatchPlan

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm" / "templates"
#: sbatch options that the flags of `gradaccum slurm` set; extra #SBATCH lines may not.
RESERVED_OPTIONS = {
    "nodes": "--nodes",
    "ntasks": "--nodes and --nproc-per-node",
    "ntasks-per-node": "--nproc-per-node",
    "gpus-per-node": "--gpus-per-node",
    "gpus": "--gpus-per-node",
    "gres": "--gpus-per-node",
    "cpus-per-task": "--cpus-per-task",
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
    "job-name": "--job-name",
    "output": "--run-dir (the output goes to RUN_DIR/slurm-%j.out)",
    "chdir": "the directory you run gradaccum from",
    "signal": "--signal-seconds",
    "requeue": "nothing: jobs are always requeueable (pre-emption)",
    "no-requeue": "nothing: pre-emption needs --requeue",
    "open-mode": "nothing: output is always appended, so a requeued run keeps the first run's output",
    "array": "separate submissions (one run directory per job)",
}
#: Job states after which a job will not run again (PREEMPTED only when not requeueable).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
}

_NAME = re.compile(r"[A-Za-z0-9_.+@:-]{1,128}")
_PARTITION = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?|UNLIMITED|INFINITE", re.IGNORECASE)
#: Characters allowed in paths that end up in #SBATCH lines, which sbatch does not unquote.
_SBATCH_PATH = re.compile(r"[A-Za-z0-9_./+@,=-]+")
_EXTRA = re.compile(r"--([a-z][a-z0-9-]*)(?:=([^\s'\"`$\\;|&<>]+))?")
_JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")


class SlurmError(UserError):
    """Slurm options that cannot work, or Slurm refusing what we asked; the message says why."""


def time_limit_seconds(spec: str) -> int | None:
    """Slurm's --time formats -> seconds (None for UNLIMITED). `MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`."""
    m = _TIME.fullmatch(spec.strip())
    if not m:
        raise SlurmError(
            f"--time {spec!r} is not a Slurm time: use MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    if spec.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (nums + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if len(nums) == 1:
        return nums[0] * 60
    if len(nums) == 2:
        return nums[0] * 60 + nums[1]
    return (nums[0] * 60 + nums[1]) * 60 + nums[2]


def _check_path(path: str, flag: str) -> str:
    if not os.path.isabs(path):
        raise SlurmError(f"{flag} {path!r} must be an absolute path")
    if not _SBATCH_PATH.fullmatch(path):
        bad = sorted({c for c in path if not _SBATCH_PATH.fullmatch(c)})
        raise SlurmError(
            f"{flag} {path!r} contains {' '.join(repr(c) for c in bad)}: #SBATCH lines cannot quote it; "
            "use a path of letters, digits and . _ - / + @ , ="
        )
    return path


def parse_extra_sbatch(line: str) -> str:
    """A user's extra #SBATCH option, checked: `--exclusive`, `--mem=0`, `#SBATCH --qos=high`."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH") :].strip()
    m = _EXTRA.fullmatch(text)
    if not m:
        raise SlurmError(
            f"extra #SBATCH option {line!r} is not of the form --name or --name=value (long options only; "
            "no spaces, quotes or shell characters in the value), e.g. --exclusive or --mem=0"
        )
    if m[1] in RESERVED_OPTIONS:
        raise SlurmError(f"extra #SBATCH option {line!r}: --{m[1]} is set by gradaccum; use {RESERVED_OPTIONS[m[1]]}")
    return text


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """What the job asks Slurm for, and where its files go. Validated on construction."""

    nodes: int
    nproc_per_node: int
    run_dir: str
    workdir: str
    launch: str = "srun"
    python: str = sys.executable
    partition: str | None = None
    time: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    job_name: str = "gradaccum"
    signal_seconds: int = 120
    preflight_timeout_s: int = 60
    extra_sbatch: tuple[str, ...] = ()
    zero_stage: int | None = None

    def __post_init__(self) -> None:
        if self.launch not in sbatch_launchers():
            raise SlurmError(f"--launch must be one of {', '.join(sbatch_launchers())}, got {self.launch!r}")
        for flag, value, low in (
            ("--nodes", self.nodes, 1),
            ("--nproc-per-node", self.nproc_per_node, 1),
            ("--gpus-per-node", self.gpus_per_node, 0),
            ("--cpus-per-task", self.cpus_per_task, 1),
            ("--signal-seconds", self.signal_seconds, 1),
            ("--preflight-timeout", self.preflight_timeout_s, 1),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise SlurmError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.signal_seconds > 65535:
            raise SlurmError(f"--signal-seconds {self.signal_seconds}: Slurm allows at most 65535")
        limit = None if self.time is None else time_limit_seconds(self.time)
        if limit is not None and self.signal_seconds >= limit:
            raise SlurmError(
                f"--signal-seconds {self.signal_seconds} is not shorter than --time {self.time} ({limit} s): "
                "the pre-emption warning would come before the job starts; give a longer --time or fewer seconds"
            )
        for flag, value, pattern in (
            ("--partition", self.partition, _PARTITION),
            ("--account", self.account, _NAME),
            ("--job-name", self.job_name, _NAME),
        ):
            if value is not None and not pattern.fullmatch(value):
                raise SlurmError(f"{flag} {value!r}: use letters, digits and _ . + - (1-128 characters)")
        _check_path(self.run_dir, "--run-dir")
        _check_path(self.workdir, "the working directory")
        if not self.python or "\n" in self.python or "\0" in self.python:
            raise SlurmError(f"--python {self.python!r} is not a usable path")
        object.__setattr__(self, "extra_sbatch", tuple(parse_extra_sbatch(x) for x in self.extra_sbatch))

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


# ---------------------------------------------------------------------------- rendering
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


def _template(name: str) -> str:
    path = TEMPLATE_DIR / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlurmError(
            f"sbatch template {path} is missing: `gradaccum slurm` reads slurm/templates/ from the source checkout"
        ) from None


def _fill(template: str, values: Mapping[str, Any]) -> str:
    """Replace {{name}} placeholders, in one pass (inserted text is not scanned again)."""
    missing = set(_PLACEHOLDER.findall(template)) - set(values)
    if missing:
        raise KeyError(f"template placeholders without values: {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m[1]]), template)


def sbatch_lines(job: SlurmJob) -> list[str]:
    tasks_per_node = LAUNCHERS[job.launch]().sbatch_tasks_per_node(job)
    cpus = job.cpus_per_task
    if cpus is not None:
        cpus = cpus * job.nproc_per_node // tasks_per_node  # a task holds all processes it forks
    options = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if job.gpus_per_node is not None:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    if cpus is not None:
        options.append(f"--cpus-per-task={cpus}")
    if job.time is not None:
        options.append(f"--time={job.time}")
    if job.partition is not None:
        options.append(f"--partition={job.partition}")
    if job.account is not None:
        options.append(f"--account={job.account}")
    options += [
        f"--chdir={job.workdir}",
        f"--output={job.run_dir}/slurm-%j.out",
        f"--signal=B:USR1@{job.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        *job.extra_sbatch,
    ]
    return [f"#SBATCH {o}" for o in options]


def render_sbatch(plan: BatchPlan, job: SlurmJob, script: str, script_args: Sequence[str] = ()) -> str:
    """The sbatch script that runs SCRIPT ARGS with `plan` as `job` describes. Pure."""
    if plan.world_size != job.world_size:
        raise SlurmError(
            f"the plan is for world size {plan.world_size} but the job has {job.nodes} node(s) × "
            f"{job.nproc_per_node} process(es) = {job.world_size}; re-plan for {job.world_size}"
        )
    backend = LAUNCHERS[job.launch]()
    if job.zero_stage is not None and "zero_stage" not in (f.dest for f in backend.flags):
        takers = [n for n, b in sbatch_launchers().items() if "zero_stage" in (f.dest for f in b.flags)]
        raise SlurmError(f"--zero-stage applies to --launch {' or '.join(takers)} only")
    values = {
        "sbatch_lines": "\n".join(sbatch_lines(job)),
        "launch_description": backend.sbatch_description,
        "global_batch_size": plan.global_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "data_parallel_size": plan.data_parallel_size,
        "nodes": job.nodes,
        "nproc_per_node": job.nproc_per_node,
        "signal_seconds": job.signal_seconds,
        "python": shlex.quote(job.python),
        "run_dir": shlex.quote(job.run_dir),
        "plan_json": plan.to_json().rstrip("\n"),
        "preflight_timeout": job.preflight_timeout_s,
        "launch": backend.sbatch_block(job, plan, script, script_args).rstrip("\n"),
    }
    return _fill(_template("job.sbatch.in"), values)


# ------------------------------------------------------------------- talking to Slurm
def _slurm(argv: Sequence[str], timeout: float = 60.0, cwd: str | None = None):
    from launcher.run import capture_command

    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        # Slurm's clients would retry for 60 s before saying so.
        raise SlurmError(
            f"SLURM_CONF={conf} does not exist: point it at your cluster's slurm.conf (or unset it), or run "
            "`slurm/local-cluster.sh up` and the `export SLURM_CONF=...` line it prints"
        )

    result = capture_command(argv, cwd=cwd, timeout=timeout)
    if result.returncode == 127:
        raise SlurmError(
            f"Slurm is not installed here: `{argv[0]}` was not found on PATH. Install Slurm's client "
            "commands (Debian: apt-get install slurm-wlm), or try the Slurm path on this machine with "
            "`slurm/local-cluster.sh up` and the `export SLURM_CONF=...` line it prints"
        )
    if result.returncode == 124:
        raise SlurmError(f"`{shlex.join(argv)}` got no answer from Slurm within {timeout:.0f} s: is slurmctld up?")
    return result


def _clean(stderr: str) -> str:
    lines = [re.sub(r"^\w+: error: ", "", line).strip() for line in stderr.strip().splitlines()]
    return "; ".join(line for line in lines if line) or "(no message)"


def explain_sbatch_error(stderr: str, job: SlurmJob | None = None) -> str:
    """sbatch's complaint plus what to do about it."""
    why = _clean(stderr)
    low = stderr.lower()
    hint = ""
    if "partition" in low and "invalid" in low:
        parts = _slurm(["sinfo", "-h", "-o", "%P"], timeout=30).stdout.split()
        hint = f"; partitions here: {', '.join(p.rstrip('*') for p in parts) or 'none'} (sinfo -s)"
        if job is not None and job.partition:
            hint = f"; there is no partition {job.partition!r}" + hint
    elif "node count" in low or "node configuration is not available" in low or "too many" in low:
        counts = _slurm(["sinfo", "-h", "-o", "%P %D"], timeout=30).stdout.split("\n")
        have = ", ".join(f"{p.split()[0].rstrip('*')}: {p.split()[1]} node(s)" for p in counts if p.strip())
        asked = f" the job asks for {job.nodes} node(s) × {job.nproc_per_node} task(s);" if job else ""
        hint = f";{asked} partitions here have {have or 'no nodes'} (sinfo); ask for fewer nodes"
    elif "configuration" in low or "controller" in low or "connection refused" in low:
        hint = (
            "; no Slurm controller answers: set SLURM_CONF to your cluster's slurm.conf, or for a cluster on "
            "this machine run `slurm/local-cluster.sh up` and the `export SLURM_CONF=...` line it prints"
        )
    return f"Slurm rejected the job: {why}{hint}"


def submit(script_text: str, plan: BatchPlan, job: SlurmJob) -> str:
    """Write job.sbatch and plan.json into the run directory, sbatch it, return the job id."""
    from launcher.atomic import write_text_atomic

    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "plan.json", plan.to_json())
    script_path = write_text_atomic(run_dir / "job.sbatch", script_text, mode=0o755)
    # --test-only first: without EnforcePartLimits (Slurm's default) sbatch accepts a job that
    # asks for more nodes or CPUs than the partition has, and it then pends forever.
    for argv in (["sbatch", "--test-only", str(script_path)], ["sbatch", "--parsable", str(script_path)]):
        result = _slurm(argv, cwd=job.workdir)
        if result.returncode != 0:
            raise SlurmError(explain_sbatch_error(result.stderr, job))
    job_id = result.stdout.strip().split(";")[0]
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"sbatch answered {result.stdout.strip()!r}, not a job id; stderr: {_clean(result.stderr)}")
    write_text_atomic(run_dir / "job_id", job_id + "\n")
    return job_id


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(str(job_id)):
        raise SlurmError(f"job id {job_id!r} is not a Slurm job id (digits, e.g. 1234 or 1234_5)")
    return str(job_id)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show -o` output (`Key=value Key2=value with spaces ...`) -> dict."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|\s*$)", line):
        out[m[1]] = m[2]
    return out


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOBID` as a dict (JobState, ExitCode, Restarts, NodeList, StdOut, ...)."""
    job_id = check_job_id(job_id)
    result = _slurm(["scontrol", "show", "job", "-o", job_id], timeout=30)
    if result.returncode != 0 or not result.stdout.strip():
        why = _clean(result.stderr)
        if "invalid job id" in why.lower():
            raise SlurmError(f"Slurm knows no job {job_id} (finished jobs are forgotten after a while): {why}")
        raise SlurmError(f"scontrol show job {job_id} failed: {why}")
    return parse_scontrol_record(result.stdout.strip().splitlines()[0])


def exit_status(info: Mapping[str, str]) -> int:
    """A finished job's exit status as a shell reports it: code, or 128 + signal."""
    code, _, sig = info.get("ExitCode", "0:0").partition(":")
    code_i, sig_i = int(code or 0), int(sig or 0)
    if code_i:
        return code_i
    if sig_i:
        return 128 + sig_i
    return 0 if info.get("JobState") == "COMPLETED" else 1


def is_final(info: Mapping[str, str]) -> bool:
    state = info.get("JobState", "")
    if state == "PREEMPTED":
        return info.get("Requeue") != "1"
    return state in FINAL_STATES


def wait_for_job(job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> dict[str, str]:
    """Poll until the job is finished for good (a requeued job is waited through); its record."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(job_id)
        if is_final(info):
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def cancel(job_id: str, signal_name: str | None = None) -> None:
    job_id = check_job_id(job_id)
    argv = ["scancel"]
    if signal_name is not None:
        if not re.fullmatch(r"[A-Z0-9]+", signal_name):
            raise SlurmError(f"signal {signal_name!r} is not a signal name like USR1 or TERM")
        argv += [f"--signal={signal_name}", "--batch"]
    job_info(job_id)  # an unknown job is an error (scancel alone says nothing and exits 0)
    # --verbose: scancel reports refusals only then, still with exit status 0.
    result = _slurm([argv[0], "--verbose", *argv[1:], job_id], timeout=30)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    if result.returncode != 0 or errors:
        raise SlurmError(f"scancel {job_id} failed: {_clean(chr(10).join(errors) or result.stderr)}")


def requeue_current_job(environ: Mapping[str, str] | None = None) -> bool:
    """`scontrol requeue $SLURM_JOB_ID` (rank 0 of a pre-empted run, after its checkpoint).

    Returns False outside Slurm. Slurm then ends every process of the job and starts the
    batch script again with SLURM_RESTART_COUNT incremented; code after this may not run.
    """
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    result = _slurm(["scontrol", "requeue", check_job_id(job_id)], timeout=60)
    if result.returncode != 0:
        raise SlurmError(f"scontrol requeue {job_id} failed: {_clean(result.stderr)}")
    return True
