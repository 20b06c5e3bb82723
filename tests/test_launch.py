"""`gradaccum launch` for real: each launcher starts 2 CPU processes on this machine, which
detect their place with launcher.env, join a gloo group through the exported variables,
all-reduce, and read the plan back from $GRADACCUM_PLAN. `gradaccum env --json` runs
inside every worker too (tests/scripts/dist_probe.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from launcher.configs import deepspeed_config
from launcher.plan import BatchPlan
from tests.conftest import REPO, gradaccum_argv, processes_naming, run_cli

PROBE = REPO / "tests" / "scripts" / "dist_probe.py"
PLAN_FLAGS = ["--global-batch-size", "8", "--micro-batch-size", "2"]
PLAN = BatchPlan.solve(8, 2, world_size=2)

pytestmark = pytest.mark.slow


def launch(tmp_path, launcher, *flags, probe_args=(), env=None, timeout=150):
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli(
        "launch",
        "--launcher",
        launcher,
        *PLAN_FLAGS,
        *flags,
        "--run-dir",
        str(tmp_path / "run"),
        "--",
        str(PROBE),
        str(out),
        *probe_args,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert r.returncode == 0, f"launch failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-6000:]}"
    ranks = []
    for rank in range(2):
        path = out / f"rank-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result; launcher output:\n{r.stderr[-4000:]}"
        ranks.append(json.loads(path.read_text()))
    return r, ranks


def check_ranks(ranks, launcher):
    for rank, seen in enumerate(ranks):
        detected = seen["detected"]
        assert detected["launcher"] == launcher
        assert (detected["rank"], detected["world_size"]) == (rank, 2)
        assert (detected["local_rank"], detected["local_world_size"], detected["node_rank"]) == (rank, 2, 0)
        assert (seen["dist_rank"], seen["dist_world_size"]) == (rank, 2)
        assert seen["allreduce_sum"] == 3.0  # 1 + 2: both ranks took part
        assert seen["plan"] == PLAN.to_dict()
        # `gradaccum env --json` inside the worker sees what the worker detected
        assert seen["gradaccum_env"] == detected
    assert ranks[0]["detected"]["master_port"] == ranks[1]["detected"]["master_port"]


def test_torchrun(tmp_path):
    r, ranks = launch(tmp_path, "torchrun", "--nproc-per-node", "2")
    check_ranks(ranks, "torchrun")
    assert "torchrun --nnodes 1 --nproc-per-node 2" in r.stderr
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == PLAN.to_dict()


def test_local_gives_workers_torchruns_variables(tmp_path):
    r, ranks = launch(tmp_path, "local", "--nproc-per-node", "2")
    check_ranks(ranks, "local")
    for rank, seen in enumerate(ranks):
        assert seen["raw"]["RANK"] == str(rank) and seen["raw"]["WORLD_SIZE"] == "2"
        assert seen["raw"]["LOCAL_RANK"] == str(rank)


@pytest.mark.mpi
def test_mpirun_workers_need_no_world_size(tmp_path):
    r, ranks = launch(tmp_path, "mpirun", "--nproc-per-node", "2", "--oversubscribe", probe_args=["--mpi4py"])
    check_ranks(ranks, "openmpi")
    for rank, seen in enumerate(ranks):
        # the worker saw only OpenMPI's variables before launcher.env exported torch's
        assert seen["raw"]["OMPI_COMM_WORLD_RANK"] == str(rank)
        assert not seen["raw"].get("RANK") and not seen["raw"].get("WORLD_SIZE")
        assert seen["mpi4py"] == {"rank": rank, "size": 2}


@pytest.mark.mpi
def test_mpirun_with_a_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:2\n")  # MPICH format: converted for mpirun in the run dir
    r, ranks = launch(tmp_path, "mpirun", "--hostfile", str(hostfile), "--oversubscribe")
    check_ranks(ranks, "openmpi")
    assert (tmp_path / "run" / "hostfile.openmpi").read_text() == "localhost slots=2\n"


@pytest.mark.deepspeed
def test_deepspeed_launcher_with_localhost_hostfile(tmp_path):
    r, ranks = launch(tmp_path, "deepspeed", "--hostfile", str(REPO / "hostfiles" / "localhost.txt"), timeout=200)
    check_ranks(ranks, "deepspeed")
    expected = deepspeed_config(PLAN)
    for rank, seen in enumerate(ranks):
        assert seen["local_rank_arg"] == rank  # DeepSpeed passes --local_rank to the script
        with open(seen["deepspeed_config"]) as f:
            assert json.load(f) == expected


@pytest.mark.slurm
def test_srun(tmp_path, slurm_env):
    r, ranks = launch(tmp_path, "srun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", env=slurm_env)
    check_ranks(ranks, "slurm")
    assert ranks[0]["detected"]["hosts"], "srun tasks know the job's node list"


@pytest.fixture(scope="module")
def slurm_env():
    """The local Slurm cluster (slurm/local-cluster.sh up is idempotent); its SLURM_CONF."""
    if shutil.which("srun") is None:
        pytest.fail("srun is missing: install slurm-wlm and munge (make os-deps)")
    r = subprocess.run(
        # --nodes 2: the shape tests/test_slurm_cluster.py needs, so no test restarts the cluster
        ["bash", str(REPO / "slurm" / "local-cluster.sh"), "up", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    m = re.search(r"^export SLURM_CONF=(\S+)$", r.stdout, re.M)
    assert r.returncode == 0 and m, f"local Slurm cluster did not come up:\n{r.stdout}\n{r.stderr}"
    return {"SLURM_CONF": m[1]}


def _env_json_per_rank(argv, tmp_path, rank_var, env=None):
    """Run `gradaccum env --json` as each rank of `argv`, one output file per rank."""
    script = f'exec "$0" env --json > {tmp_path}/env-"${rank_var}".json'
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(
        [*argv, "sh", "-c", script, gradaccum_argv()[0]], capture_output=True, text=True, timeout=120, env=full_env
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads((tmp_path / f"env-{rank}.json").read_text()) for rank in range(2)]


def _mpirun():
    argv = [shutil.which("mpirun") or "mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
    return argv[:1] + ["--allow-run-as-root"] + argv[1:] if os.geteuid() == 0 else argv


def test_gradaccum_env_inside_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python"]
    seen = _env_json_per_rank(torchrun, tmp_path, "RANK")
    assert [(s["launcher"], s["rank"], s["world_size"]) for s in seen] == [("torchrun", 0, 2), ("torchrun", 1, 2)]


@pytest.mark.mpi
def test_gradaccum_env_inside_mpirun_and_the_mpi4py_fallback(tmp_path):
    seen = _env_json_per_rank(_mpirun(), tmp_path, "OMPI_COMM_WORLD_RANK")
    assert [(s["launcher"], s["rank"], s["world_size"]) for s in seen] == [("openmpi", 0, 2), ("openmpi", 1, 2)]
    # Without OMPI_COMM_WORLD_* (as under `srun --mpi=pmix`) the MPI library itself answers.
    hide = ["env", "-u", "OMPI_COMM_WORLD_RANK", "-u", "OMPI_COMM_WORLD_SIZE"]
    script = f'exec "$0" env --json > {tmp_path}/mpi4py-"$PMIX_RANK".json'
    r = subprocess.run(
        [*_mpirun(), *hide, "sh", "-c", script, gradaccum_argv()[0]], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"mpi4py-{rank}.json").read_text())
        assert (got["launcher"], got["rank"], got["world_size"], got["local_world_size"]) == ("mpi4py", rank, 2, 2)


@pytest.mark.slurm
def test_gradaccum_env_inside_srun(tmp_path, slurm_env):
    srun = ["srun", "--nodes=1", "--ntasks=2"]
    seen = _env_json_per_rank(srun, tmp_path, "SLURM_PROCID", env=slurm_env)
    assert [(s["launcher"], s["rank"], s["world_size"]) for s in seen] == [("slurm", 0, 2), ("slurm", 1, 2)]
    assert seen[0]["hosts"] and seen[0]["master_addr"] == seen[0]["hosts"][0]


# ------------------------------------------- real training matches the reference
TRAIN = REPO / "examples" / "train.py"
STEPS = 2


@pytest.fixture(scope="module")
def reference_state():
    """The single-process reference: one whole global batch per optimizer step."""
    import torch

    from trainers import ReferenceTrainer
    from trainers.example import task

    torch.set_num_threads(1)
    trainer = ReferenceTrainer.from_task(task(), PLAN, shuffle=False)
    trainer.train(STEPS)
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


# torchrun, deepspeed, srun and local train to the same losses as mpirun in test_launch_docs.py.
@pytest.mark.mpi
def test_mpirun_training_matches_the_reference(tmp_path, reference_state):
    import torch

    from trainers.verify import compare_states

    output = tmp_path / "final.pt"
    r = run_cli(
        "launch",
        "--launcher",
        "mpirun",
        "--oversubscribe",
        *PLAN_FLAGS,
        "--nproc-per-node",
        "2",
        "--run-dir",
        str(tmp_path / "run"),
        "--",
        str(TRAIN),
        "--steps",
        str(STEPS),
        "--no-shuffle",
        "--output",
        str(output),
        timeout=200,
        cwd=tmp_path,
    )
    assert r.returncode == 0, f"training launch failed ({r.returncode}):\n{r.stderr[-6000:]}"
    assert "(openmpi)" in r.stderr  # the trainer found its rank through OMPI_COMM_WORLD_*
    assert re.findall(r"allreduce_rounds (\d+)", r.stdout) == ["1"] * STEPS  # accumulation 2, one sync per step
    diff = compare_states(reference_state, torch.load(output, weights_only=True))
    assert diff["max_rel_diff"] <= 1e-5, f"mpirun training differs from the reference: {diff}"


# ------------------------------------------- the script's batch flags and the launcher's plan
def _launch_train(tmp_path, *script_args):
    return run_cli(
        "launch",
        "--launcher",
        "local",
        "--nproc-per-node",
        "2",
        *PLAN_FLAGS,
        "--run-dir",
        str(tmp_path / "run"),
        "--",
        str(TRAIN),
        "--steps",
        "1",
        "--output",
        str(tmp_path / "final.pt"),
        *script_args,
        timeout=200,
        cwd=tmp_path,
    )


def test_a_script_batch_flag_that_disagrees_with_the_plan_is_an_error_naming_both(tmp_path):
    # the plan says global 8 = micro 2 × accumulation 2 × 2 ranks; the script was told 32 and 4
    r = _launch_train(
        tmp_path, "--global-batch-size", "32", "--micro-batch-size", "2", "--gradient-accumulation-steps", "4"
    )
    assert r.returncode != 0, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if "train.py (rank" in line]
    assert errors, r.stderr[-4000:]  # one line per rank that got there first (the launcher stops the rest)
    for line in errors:
        assert "--global-batch-size 32 but the plan has 8" in line
        assert "--gradient-accumulation-steps 4 but the plan has 2" in line
        assert "--micro-batch-size" not in line  # it agrees
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "final.pt").exists()
    assert processes_naming(str(tmp_path)) == []


def test_script_batch_flags_that_agree_with_the_plan_are_fine(tmp_path):
    r = _launch_train(tmp_path, "--global-batch-size", "8", "--micro-batch-size", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert re.findall(r"items (\d+)", r.stdout) == ["8"]  # one step of the plan's global batch
    assert (tmp_path / "final.pt").exists()
    assert processes_naming(str(tmp_path)) == []
