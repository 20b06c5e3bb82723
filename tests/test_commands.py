"""Rendered launcher commands, pinned by golden files (tests/golden/commands/*.txt).

Regenerate after an intended change with GRADACCUM_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import commands
from launcher.commands import CommandError
from launcher.hostfile import HostfileError
from tests.conftest import REPO, run_cli
from tests.markers import by_tool

GOLDEN = REPO / "tests" / "golden" / "commands"
UPDATE = os.environ.get("GRADACCUM_UPDATE_GOLDEN") == "1"
PY = ["python", "-u", "train.py", "--lr", "0.1"]


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with GRADACCUM_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name}: rendered command differs from {path}"


BUILDERS = {
    "torchrun_single_node": lambda: commands.torchrun("train.py", ["--lr", "0.1"], nproc_per_node=2, master_port=29500),
    "torchrun_static_two_nodes": lambda: commands.torchrun(
        "train.py", ["--lr", "0.1"], nproc_per_node=4, nnodes=2, node_rank=1, master_addr="node01", master_port=29500
    ),
    "torchrun_c10d": lambda: commands.torchrun(
        "train.py", [], nproc_per_node=4, nnodes=2, rdzv_endpoint="node01:29400", rdzv_id="1234", max_restarts=3
    ),
    "torchrun_elastic": lambda: commands.torchrun(
        "train.py", [], nproc_per_node=2, nnodes="1:4", rdzv_endpoint="[fd00::1]:29400", rdzv_id="job-7"
    ),
    "torchrun_python_module": lambda: commands.torchrun(
        "-weird.py", [], nproc_per_node=2, program=["python", "-m", "torch.distributed.run"]
    ),
    "deepspeed_cpu_local": lambda: commands.deepspeed(
        "train.py", ["--lr", "0.1"], num_gpus=2, master_addr="127.0.0.1", master_port=29500
    ),
    "deepspeed_hostfile_include": lambda: commands.deepspeed(
        "train.py",
        [],
        hostfile="hostfiles/deepspeed.txt",
        include="worker-0@worker-1:0,2",
        master_addr="worker-0",
        master_port=29500,
        launcher="pdsh",
    ),
    "deepspeed_localhost_hostfile": lambda: commands.deepspeed(
        "train.py", [], hostfile="hostfiles/localhost.txt", master_addr="127.0.0.1", master_port=29500, single_host=True
    ),
    "deepspeed_openmpi_nodes": lambda: commands.deepspeed(
        "train.py", [], hostfile="hosts", num_nodes=2, num_gpus=8, master_addr="10.0.0.1", launcher="openmpi"
    ),
    "mpirun_single_node_root": lambda: commands.mpirun(PY, np=2, allow_run_as_root=True, oversubscribe=True),
    "mpirun_hostfile": lambda: commands.mpirun(PY, np=8, hostfile="hostfile.openmpi"),
    "mpirun_nodes_ppr": lambda: commands.mpirun(PY, np=8, procs_per_node=4, export=["GRADACCUM_PLAN"]),
    "srun_tasks": lambda: commands.srun(PY, nodes=2, ntasks_per_node=2),
    "srun_torchrun_per_node": lambda: commands.srun(
        commands.torchrun("train.py", [], nproc_per_node=4, nnodes=2, rdzv_endpoint="node01:29400", rdzv_id="77"),
        nodes=2,
        ntasks_per_node=1,
        extra={"cpu-bind": "none"},
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rendered_command_matches_golden(name):
    argv = BUILDERS[name]()
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    _check_golden(name, shlex.join(argv) + "\n")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: commands.torchrun("t.py", nproc_per_node=0), "--nproc-per-node must be a positive integer"),
        (lambda: commands.torchrun("t.py", nproc_per_node=2, nnodes=2), "needs --node-rank R and --master-addr"),
        (lambda: commands.torchrun("t.py", nproc_per_node=2, nnodes="1:4"), "elastic --nnodes 1:4 needs c10d"),
        (lambda: commands.torchrun("t.py", nproc_per_node=2, nnodes="4:1"), "need 1 <= MIN <= MAX"),
        (lambda: commands.torchrun("t.py", nproc_per_node=2, nnodes="x"), "must be N or MIN:MAX"),
        (
            lambda: commands.torchrun("t.py", nproc_per_node=2, nnodes=2, node_rank=2, master_addr="a"),
            "--node-rank 2 must be in 0..1",
        ),
        (lambda: commands.torchrun("t.py", nproc_per_node=2, rdzv_endpoint="a:1"), "needs both"),
        (
            lambda: commands.torchrun("t.py", nproc_per_node=2, rdzv_endpoint="a", rdzv_id="1"),
            "must be HOST:PORT",
        ),
        (
            lambda: commands.torchrun("t.py", nproc_per_node=2, rdzv_endpoint="a:1", rdzv_id="x;y"),
            "--rdzv-id",
        ),
        (lambda: commands.torchrun("t.py", nproc_per_node=2, master_port=0), "TCP port"),
        (lambda: commands.deepspeed("t.py", include="a", exclude="b"), "cannot be combined"),
        (lambda: commands.deepspeed("t.py", include="a", num_gpus=2), "--num_nodes/--num_gpus together"),
        (lambda: commands.deepspeed("t.py", launcher="ssh"), "must be one of"),
        (lambda: commands.mpirun(PY, np=0), "-np must be a positive integer"),
        (lambda: commands.mpirun(PY, np=2, export=["A;B"]), "not a variable name"),
        (lambda: commands.srun(PY, nodes=0, ntasks_per_node=1), "--nodes"),
        (lambda: commands.srun(PY, nodes=1, ntasks_per_node=1, extra={"--x": "1"}), "not an option name"),
    ],
)
def test_builder_errors(build, message):
    with pytest.raises(CommandError, match=message):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: commands.torchrun("t.py", nproc_per_node=2, nnodes=2, node_rank=0, master_addr="-oProxy=x"),
        lambda: commands.torchrun("t.py", nproc_per_node=2, rdzv_endpoint="a b:1", rdzv_id="1"),
        lambda: commands.deepspeed("t.py", master_addr="$(id)"),
        lambda: commands.worker_env("plan.json", master_addr="a;b"),
    ],
)
def test_host_names_reaching_command_lines_are_validated(build):
    with pytest.raises(HostfileError):
        build()


def test_worker_env():
    assert commands.worker_env("/r/plan.json", "/r/ds.json", "node01", 29500) == {
        "GRADACCUM_PLAN": "/r/plan.json",
        "GRADACCUM_DEEPSPEED_CONFIG": "/r/ds.json",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500",
    }


# ------------------------------------------------- `gradaccum launch --dry-run`
PLAN = ["--global-batch-size", "16", "--micro-batch-size", "2"]
DRY_RUNS = {
    "launch_torchrun": ["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2"],
    "launch_torchrun_c10d": [
        "--launcher",
        "torchrun",
        *PLAN,
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        "node01:29400",
        "--rdzv-id",
        "42",
    ],
    "launch_deepspeed": ["--launcher", "deepspeed", *PLAN, "--nproc-per-node", "2"],
    "launch_deepspeed_hostfile": [
        "--launcher",
        "deepspeed",
        "--global-batch-size",
        "24",
        "--micro-batch-size",
        "2",
        "--hostfile",
        "hostfiles/deepspeed.txt",
        "--include",
        "worker-0@worker-1:0,2",
    ],
    "launch_mpirun": ["--launcher", "mpirun", *PLAN, "--nproc-per-node", "2", "--oversubscribe"],
    "launch_mpirun_hostfile": ["--launcher", "mpirun", *PLAN, "--hostfile", "hostfiles/openmpi.txt"],
    "launch_srun": ["--launcher", "srun", *PLAN, "--nproc-per-node", "2", "--nnodes", "2"],
    "launch_local": ["--launcher", "local", *PLAN, "--nproc-per-node", "2"],
}


def _normalise(text: str) -> str:
    """Replace this machine's paths so the golden file holds only what we render."""
    for name in ("torchrun", "deepspeed", "mpirun", "srun"):
        found = Path(sys.executable).parent / name
        path = str(found) if found.exists() else shutil.which(name)
        if path:
            text = text.replace(path, name)
    text = re.sub(r"\S*/python[0-9.]*(?=\s)", "python", text)
    text = text.replace(" -x PYTHONPATH", "")  # forwarded only when set here
    if os.geteuid() != 0:  # the golden file was written as root
        text = text.replace("/mpirun -np", "/mpirun --allow-run-as-root -np").replace(
            "mpirun -np", "mpirun --allow-run-as-root -np"
        )
    return text


@pytest.mark.parametrize("name", by_tool(sorted(DRY_RUNS)))
def test_dry_run_prints_the_command_and_writes_nothing(name, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("launch", *DRY_RUNS[name], "--master-port", "29500", "--run-dir", "/RUN", "--dry-run", "--", "train.py")
    assert r.returncode == 0, r.stderr
    assert "global batch size" in r.stderr  # the resolved plan, on stderr
    _check_golden(name, _normalise(r.stdout))
    assert not run_dir.exists()
    assert "--dry-run wrote nothing; the command reads /RUN/plan.json" in r.stderr  # says what it needs
    assert "<" not in r.stdout  # real shell syntax, no placeholders
    assert subprocess.run(["bash", "-n", "-c", r.stdout], capture_output=True).returncode == 0, r.stdout


# ------------------------------------------------------ `gradaccum launch` errors
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--dry-run"], "no script"),
        (["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--", "missing.py"], "does not exist"),
        (["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--", "tests"], "'tests' is a directory"),
        (["--launcher", "torchrun", *PLAN, "--dry-run", "--", "t.py"], "the world size is required"),
        (["--launcher", "torchrun", *PLAN, "--hostfile", "hostfiles/localhost.txt", "--", "t.py"], "--hostfile is for"),
        (
            ["--launcher", "mpirun", *PLAN, "--nproc-per-node", "2", "--include", "a", "--", "t.py"],
            "filter a --hostfile",
        ),
        (
            [
                "--launcher",
                "mpirun",
                *PLAN,
                "--hostfile",
                "hostfiles/localhost.txt",
                "--nproc-per-node",
                "2",
                "--",
                "t",
            ],
            "drop --nproc-per-node",
        ),
        (["--launcher", "mpirun", *PLAN, "--hostfile", "hostfiles/deepspeed.txt", "--nnodes", "2", "--", "t"], "has 3"),
        (["--launcher", "mpirun", *PLAN, "--nproc-per-node", "2", "--nnodes", "1:2", "--", "t"], "only for --launcher"),
        (["--launcher", "local", *PLAN, "--nproc-per-node", "1", "--nnodes", "2", "--", "t"], "this machine only"),
        (
            ["--launcher", "torchrun", "--global-batch-size", "8", "--nproc-per-node", "1", "--nnodes", "2:4"]
            + ["--rdzv-endpoint", "h:1", "--rdzv-id", "1", "--", "t.py"],
            "cannot be kept with 3 node(s)",
        ),
        (["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--oversubscribe", "--", "t"], "mpirun option"),
        (
            ["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--zero-stage", "1", "--", "t"],
            "for --launcher deep",
        ),
        (["--launcher", "mpirun", *PLAN, "--nproc-per-node", "2", "--node-rank", "0", "--", "t"], "torchrun option"),
        (["--launcher", "torchrun", "--global-batch-size", "7", "--nproc-per-node", "2", "--", "t"], "not divisible"),
        (["--launcher", "mpirun", *PLAN, "--nproc-per-node", "2", "--master-addr", "$(id)", "--", "t"], "not a valid"),
        (["--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--nnodes", "2", "--", "t"], "--node-rank R"),
        (["--launcher", "local", *PLAN, "--nproc-per-node", "2", "--master-port", "70000", "--", "t"], "TCP port"),
    ],
)
def test_launch_errors_exit_2_with_a_message(flags, message, capsys, tmp_path, monkeypatch):
    from launcher.cli import main

    monkeypatch.chdir(REPO)
    assert main(["launch", *flags, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "nothing is written when the launch is refused"


def test_torchrun_with_restarts_gets_a_fresh_store_per_attempt():
    r = run_cli(
        "launch", "--launcher", "torchrun", "--global-batch-size", "8", "--micro-batch-size", "2",
        "--nproc-per-node", "2", "--max-restarts", "2", "--dry-run", "--", "examples/train.py",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in r.stdout and "--max-restarts 2" in r.stdout
