"""`gradaccum slurm render|submit|status|cancel`: sbatch scripts from the plan, and Slurm's own CLI.

    gradaccum slurm submit --nodes 2 --nproc-per-node 8 --gpus-per-node 8 --time 04:00:00 \
        --global-batch-size 512 --micro-batch-size 4 -- examples/train.py --steps 1000

Imports nothing heavy: the work is in launcher.slurm.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launcher.backends import sbatch_launchers
from launcher.cli.common import add_batch_args, add_json_flag, info, plan_from_args, print_json
from launcher.errors import UserError

ORDER = 70


def _add_job_args(p: argparse.ArgumentParser) -> None:
    add_batch_args(p)
    s = p.add_argument_group("Slurm job (world size = nodes × processes per node)")
    s.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    s.add_argument("--nproc-per-node", type=int, required=True, metavar="P", help="processes (GPUs) per node")
    launchers = sbatch_launchers()
    s.add_argument(
        "--launch",
        choices=tuple(launchers),
        default="srun",
        help="how the job starts the workers (default srun): "
        + "; ".join(f"{name}: {cls.sbatch_description}" for name, cls in launchers.items()),
    )
    s.add_argument("--partition", metavar="NAME")
    s.add_argument("--time", metavar="T", help="time limit: MINUTES, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--gpus-per-node", type=int, metavar="G")
    s.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per process")
    s.add_argument("--account", metavar="A")
    s.add_argument("--job-name", default="gradaccum", metavar="NAME")
    s.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        metavar="S",
        help="pre-emption warning: USR1 this many seconds before the time limit (default 120)",
    )
    s.add_argument(
        "--preflight-timeout", type=int, default=60, metavar="S", help="rendezvous preflight per node (default 60)"
    )
    s.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an extra #SBATCH option, e.g. --sbatch=--exclusive --sbatch=--mem=0 (repeatable)",
    )
    s.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="--launch deepspeed: ZeRO stage")
    s.add_argument("--run-dir", metavar="DIR", help="job.sbatch, plan.json, output (default ./gradaccum-runs/...)")
    s.add_argument("--python", default=sys.executable, metavar="PATH", help="the workers' Python (default: this one)")
    p.add_argument("script_command", nargs=argparse.REMAINDER, metavar="-- SCRIPT ARGS", help="the training script")


def register(subparsers: argparse._SubParsersAction) -> None:
    top = subparsers.add_parser(
        "slurm",
        help="render / submit sbatch scripts; status and cancel of Slurm jobs",
        description=(
            "Render an sbatch script from the batch plan (one srun task per process, torchrun per node, "
            "or deepspeed --launcher slurm), submit it, follow it, cancel it. The script forwards "
            "pre-emption signals (USR1, TERM) to the workers and is requeueable."
        ),
    )
    sub = top.add_subparsers(dest="slurm_command", metavar="ACTION")
    sub.required = True
    render = sub.add_parser("render", help="print the sbatch script", description="Print the sbatch script.")
    _add_job_args(render)
    render.set_defaults(func=run_render)
    submit = sub.add_parser(
        "submit",
        help="write the script and plan into a run directory and sbatch it",
        description=(
            "Write job.sbatch and plan.json into the run directory, call `sbatch --parsable`, print the "
            "job id (alone on the last line of stdout). With --wait, wait for the job (through requeues) "
            "and exit with its exit status."
        ),
    )
    _add_job_args(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the job; exit with its status")
    submit.set_defaults(func=run_submit)
    status = sub.add_parser("status", help="state of a job", description="Show a job's state (scontrol show job).")
    status.add_argument("job_id", metavar="JOBID")
    add_json_flag(status)
    status.set_defaults(func=run_status)
    cancel = sub.add_parser("cancel", help="cancel a job", description="Cancel a job (scancel).")
    cancel.add_argument("job_id", metavar="JOBID")
    cancel.set_defaults(func=run_cancel)


def _script(args: argparse.Namespace, must_exist: bool) -> tuple[str, list[str]]:
    command = list(args.script_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("no script: end the flags with `-- SCRIPT [ARGS]`, e.g. `-- examples/train.py --steps 100`")
    if must_exist and not os.path.isfile(command[0]):
        raise UserError(f"script {command[0]!r} does not exist here (paths are relative to {os.getcwd()})")
    return command[0], command[1:]


def _default_run_dir(job_name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("gradaccum-runs") / f"{job_name}-{stamp}-{os.getpid()}")


def _build(args: argparse.Namespace, must_exist: bool):
    from launcher.slurm import SlurmError, SlurmJob, render_sbatch

    script, script_args = _script(args, must_exist)
    for flag, value in (("--nodes", args.nodes), ("--nproc-per-node", args.nproc_per_node)):
        if value <= 0:
            raise SlurmError(f"{flag} must be a positive integer, got {value}")
    plan = plan_from_args(args, world_size=args.nodes * args.nproc_per_node)
    job = SlurmJob(
        nodes=args.nodes,
        nproc_per_node=args.nproc_per_node,
        run_dir=os.path.abspath(args.run_dir or _default_run_dir(args.job_name or "gradaccum")),
        workdir=os.getcwd(),
        launch=args.launch,
        python=args.python,
        partition=args.partition,
        time=args.time,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        account=args.account,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        preflight_timeout_s=args.preflight_timeout,
        extra_sbatch=tuple(args.sbatch),
        zero_stage=args.zero_stage,
    )
    return plan, job, render_sbatch(plan, job, script, script_args)


def run_render(args: argparse.Namespace) -> int:
    _, _, text = _build(args, must_exist=False)
    sys.stdout.write(text)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from launcher import slurm

    plan, job, text = _build(args, must_exist=True)
    info(plan.describe())
    job_id = slurm.submit(text, plan, job)
    info(f"gradaccum slurm: submitted job {job_id}; run directory {job.run_dir}")
    info(f"gradaccum slurm: output {job.run_dir}/slurm-{job_id}.out")
    print(job_id, flush=True)
    if not args.wait:
        return 0
    record = slurm.wait_for_job(job_id)
    status = slurm.exit_status(record)
    info(
        f"gradaccum slurm: job {job_id} {record.get('JobState')} (exit code {record.get('ExitCode')}, "
        f"restarts {record.get('Restarts', '0')}); exiting with {status}"
    )
    return status


def run_status(args: argparse.Namespace) -> int:
    from launcher import slurm

    record = slurm.job_info(args.job_id)
    summary = {
        "job_id": record.get("JobId", args.job_id),
        "name": record.get("JobName"),
        "state": record.get("JobState"),
        "reason": record.get("Reason"),
        "exit_code": record.get("ExitCode"),
        "restarts": int(record.get("Restarts", "0") or 0),
        "nodes": record.get("NodeList"),
        "run_time": record.get("RunTime"),
        "stdout": record.get("StdOut"),
        "final": slurm.is_final(record),
    }
    if args.json:
        print_json(summary)
    else:
        for key, value in summary.items():
            print(f"{key:>9}: {value}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    from launcher import slurm

    slurm.cancel(args.job_id)
    info(f"gradaccum slurm: cancelled job {args.job_id}")
    return 0
