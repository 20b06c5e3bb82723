"""sbatch rendering (golden files), option validation, scontrol parsing, and the rendered
script checked by bash itself. Pure: no Slurm needed (the real jobs are in test_slurm_cluster.py).

Regenerate the golden files after an intended change with GRADACCUM_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from launcher import BatchPlan
from launcher.slurm import (
    SlurmError,
    SlurmJob,
    exit_status,
    is_final,
    parse_extra_sbatch,
    parse_scontrol_record,
    render_sbatch,
    time_limit_seconds,
)
from tests.conftest import REPO, run_cli

GOLDEN = REPO / "tests" / "golden" / "slurm"
UPDATE = os.environ.get("GRADACCUM_UPDATE_GOLDEN") == "1"
SCRIPT_ARGS = ["--steps", "1000", "--output", "final.pt"]


def _job(**kw) -> SlurmJob:
    base = dict(nodes=2, nproc_per_node=8, run_dir="/scratch/runs/llm", workdir="/home/me/project")
    base["python"] = "/opt/venv/bin/python"
    return SlurmJob(**{**base, **kw})


CASES = {
    "srun_2x8_gpu": (dict(gpus_per_node=8, cpus_per_task=6, time="04:00:00", partition="gpu", account="proj"), 512),
    "torchrun_2x8_gpu": (
        dict(launch="torchrun", gpus_per_node=8, cpus_per_task=6, time="04:00:00", partition="gpu", job_name="llm"),
        512,
    ),
    "deepspeed_2x8_gpu": (dict(launch="deepspeed", gpus_per_node=8, time="1-00:00:00", zero_stage=2), 512),
    "srun_1x2_cpu_extra": (
        dict(nodes=1, nproc_per_node=2, signal_seconds=30, extra_sbatch=("--exclusive", "#SBATCH --mem=0")),
        8,
    ),
}


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.sbatch"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with GRADACCUM_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path} differs from the rendered script; if intended, regenerate it"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(name):
    kw, global_batch = CASES[name]
    job = _job(**kw)
    plan = BatchPlan.solve(global_batch, 4 if global_batch > 8 else 2, world_size=job.world_size)
    _check_golden(name, render_sbatch(plan, job, "examples/train.py", SCRIPT_ARGS))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_is_valid_bash(name, tmp_path):
    kw, global_batch = CASES[name]
    job = _job(**kw)
    plan = BatchPlan.solve(global_batch, 4 if global_batch > 8 else 2, world_size=job.world_size)
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch(plan, job, "examples/train.py", SCRIPT_ARGS))
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_srun_mode_lines():
    text = render_sbatch(BatchPlan.solve(512, 4, world_size=16), _job(gpus_per_node=8), "train.py")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --output=/scratch/runs/llm/slurm-%j.out",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
    ):
        assert line in text.splitlines(), line
    assert 'rendezvous=$("$PYTHON" -m launcher.slurm_job master) || exit 2' in text
    assert "srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --kill-on-bad-exit=1" in text


def test_torchrun_mode_has_one_task_per_node_and_c10d_at_node_addr():
    text = render_sbatch(BatchPlan.solve(512, 4, world_size=16), _job(launch="torchrun", cpus_per_task=4), "t.py")
    assert "#SBATCH --ntasks-per-node=1" in text.splitlines()
    assert "#SBATCH --cpus-per-task=32" in text.splitlines()  # 8 processes × 4 CPUs in the one task
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32" in text
    assert '--nnodes "$SLURM_NNODES" --nproc-per-node 8 --rdzv-backend c10d' in text
    assert '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"' in text
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("--node-rank" in line for line in commands)


def test_plan_travels_inside_the_script():
    plan = BatchPlan.solve(48, 2, world_size=4)
    text = render_sbatch(plan, _job(nodes=2, nproc_per_node=2), "t.py")
    body = text.split("<<'GRADACCUM_JSON'\n", 1)[1].split("\nGRADACCUM_JSON", 1)[0]
    assert BatchPlan.from_dict(__import__("json").loads(body)) == plan


def test_script_args_are_quoted():
    text = render_sbatch(BatchPlan.solve(8, 2, world_size=2), _job(nodes=1, nproc_per_node=2), "my script.py", ["$(x)"])
    assert "'my script.py' '$(x)'" in text


def test_world_size_must_match_plan():
    with pytest.raises(SlurmError, match="world size 4 .* 2 node\\(s\\) × 8 process\\(es\\) = 16"):
        render_sbatch(BatchPlan.solve(8, 2, world_size=4), _job(), "t.py")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(nodes=0), "--nodes must be an integer >= 1"),
        (dict(launch="mpirun"), "--launch must be one of"),
        (dict(time="5 hours"), "is not a Slurm time"),
        (dict(time="2", signal_seconds=120), "not shorter than --time 2"),
        (dict(partition="gpu;rm"), "--partition"),
        (dict(job_name="a b"), "--job-name"),
        (dict(run_dir="relative/dir"), "must be an absolute path"),
        (dict(run_dir="/tmp/with space"), "#SBATCH lines cannot quote it"),
        (dict(extra_sbatch=("--ntasks=4",)), "--ntasks is set by gradaccum; use --nodes and --nproc-per-node"),
        (dict(extra_sbatch=("--output=x",)), "--output is set by gradaccum"),
        (dict(extra_sbatch=("--mem 4G",)), "is not of the form --name"),
        (dict(extra_sbatch=("--comment=$(reboot)",)), "is not of the form --name"),
        (dict(extra_sbatch=("-N 3",)), "long options only"),
        (dict(signal_seconds=70000), "at most 65535"),
    ],
)
def test_bad_job_options_are_clear_errors(kw, message):
    with pytest.raises(SlurmError, match=message.replace("(", "\\(").replace(")", "\\)")):
        _job(**kw)


def test_extra_sbatch_accepts_prefixed_lines():
    assert parse_extra_sbatch("#SBATCH --qos=high") == "--qos=high"
    assert parse_extra_sbatch("  --exclusive ") == "--exclusive"


@pytest.mark.parametrize(
    "spec, seconds",
    [("30", 1800), ("10:05", 605), ("01:00:00", 3600), ("1-02", 93600), ("1-00:30", 88200), ("UNLIMITED", None)],
)
def test_time_limits(spec, seconds):
    assert time_limit_seconds(spec) == seconds


def test_parse_scontrol_record_with_spaces():
    line = (
        "JobId=42 JobName=train UserId=root(0) JobState=COMPLETED Reason=None Requeue=1 Restarts=1 "
        "ExitCode=0:0 NodeList=n[1-2] Command=/tmp/a b/job.sbatch StdOut=/runs/slurm-42.out"
    )
    rec = parse_scontrol_record(line)
    assert rec["JobId"] == "42" and rec["Restarts"] == "1" and rec["NodeList"] == "n[1-2]"
    assert rec["Command"] == "/tmp/a b/job.sbatch" and rec["StdOut"] == "/runs/slurm-42.out"


@pytest.mark.parametrize(
    "rec, final, status",
    [
        ({"JobState": "COMPLETED", "ExitCode": "0:0"}, True, 0),
        ({"JobState": "FAILED", "ExitCode": "3:0"}, True, 3),
        ({"JobState": "CANCELLED", "ExitCode": "0:15"}, True, 143),
        ({"JobState": "TIMEOUT", "ExitCode": "0:0"}, True, 1),
        ({"JobState": "PREEMPTED", "Requeue": "1", "ExitCode": "0:0"}, False, 1),
        ({"JobState": "PENDING", "ExitCode": "0:0"}, False, 1),
    ],
)
def test_job_states(rec, final, status):
    assert is_final(rec) is final
    if final:
        assert exit_status(rec) == status


def test_cli_render_prints_the_script(tmp_path):
    r = run_cli(
        "slurm", "render", "--nodes", "2", "--nproc-per-node", "4", "--global-batch-size", "64",
        "--micro-batch-size", "2", "--gpus-per-node", "4", "--run-dir", str(tmp_path / "run"),
        "--", "examples/train.py", "--steps", "5",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash\n#SBATCH --job-name=gradaccum\n#SBATCH --nodes=2\n")
    assert f"#SBATCH --output={tmp_path}/run/slurm-%j.out" in r.stdout
    assert '"$PYTHON" -u examples/train.py --steps 5 &' in r.stdout
    assert not (tmp_path / "run").exists(), "render must write nothing"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--global-batch-size", "9", "--micro-batch-size", "2"], "not divisible"),
        (["--global-batch-size", "8", "--sbatch=--nodes=3"], "--nodes is set by gradaccum"),
        (["--global-batch-size", "8", "--time", "tomorrow"], "is not a Slurm time"),
        (["--global-batch-size", "8", "--zero-stage", "2"], "--zero-stage applies to --launch deepspeed only"),
    ],
)
def test_cli_render_errors_exit_2(args, message):
    r = run_cli("slurm", "render", "--nproc-per-node", "2", *args, "--", "train.py")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_render_without_script_is_an_error():
    r = run_cli("slurm", "render", "--nproc-per-node", "2", "--global-batch-size", "8")
    assert r.returncode == 2 and "no script" in r.stderr


def test_cli_status_rejects_a_bad_job_id():
    r = run_cli("slurm", "status", "12;rm")
    assert r.returncode == 2 and "is not a Slurm job id" in r.stderr


def test_cli_module_imports_no_torch():
    code = "import sys, launcher.cli.slurm, launcher.slurm; print('torch' in sys.modules)"
    r = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(REPO))
    assert r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------- in-job helpers (launcher.slurm_job)
def test_preflight_accepts_a_reachable_master_with_nothing_listening():
    from launcher.slurm_job import preflight
    from tests.conftest import free_port

    port = free_port()
    line = preflight("127.0.0.1", port, timeout_s=5, is_master=True)
    assert "reachable (nothing listens yet)" in line and "port free" in line


def test_preflight_rejects_a_port_in_use_and_a_name_that_does_not_resolve():
    import socket

    from launcher.slurm_job import preflight

    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SlurmError, match=f"port {port} is already in use on the master node"):
            preflight("127.0.0.1", port, timeout_s=5, is_master=True)
        with pytest.raises(SlurmError, match="something already listens on the master's port"):
            preflight("127.0.0.1", port, timeout_s=5, is_master=False)
    with pytest.raises(SlurmError, match="does not resolve"):
        preflight("no-such-host.invalid", 1234, timeout_s=10, is_master=False)
