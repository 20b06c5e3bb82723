"""Real Slurm jobs on the local cluster (slurm/local-cluster.sh up --nodes 2): training under
srun tasks and torchrun per node (DDP and FSDP) matches the single-process reference, pre-emption by USR1
checkpoints, requeues and resumes to the same weights, status/cancel, clear submit errors,
the rendezvous preflight, and the cluster script's own lifecycle.

Slurm missing is a failure, not a skip: `make os-deps` installs it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"
PLAN_FLAGS = ["--global-batch-size", "8", "--micro-batch-size", "2"]  # accumulation 2 at world 2
STEPS = 6
TOLERANCE = 1e-5


def cluster_up(nodes: int, env: dict[str, str] | None = None) -> str:
    """Start (or keep) the cluster; its SLURM_CONF, from the last line `up` prints."""
    for tool in ("sbatch", "srun", "slurmctld", "munged"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.fail(f"{tool} is missing: install Slurm and munge (make os-deps)")
    r = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "up", "--nodes", str(nodes)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )
    lines = r.stdout.strip().splitlines()
    m = re.fullmatch(r"export SLURM_CONF=(\S+)", lines[-1]) if lines else None
    assert r.returncode == 0 and m, f"local Slurm cluster did not come up:\n{r.stdout}\n{r.stderr}"
    return m[1]


@pytest.fixture(scope="session")
def slurm_env():
    """The shared two-node cluster, left running for other test files and sessions."""
    return {"SLURM_CONF": cluster_up(2), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # tests.scripts.*


@functools.cache
def reference_state(steps: int):
    """The single-process reference: one whole global batch per step."""
    from launcher import BatchPlan
    from trainers import ReferenceTrainer, load_task

    trainer = ReferenceTrainer.from_task(load_task("trainers.example:task"), BatchPlan.solve(8, world_size=1))
    trainer.train(steps)
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def assert_matches(state_path: Path, expected=None, tolerance: float = TOLERANCE) -> dict:
    import torch

    from trainers.verify import compare_states

    got = torch.load(state_path, map_location="cpu", weights_only=True)
    cmp = compare_states(reference_state(STEPS) if expected is None else expected, got)
    assert cmp["max_rel_diff"] <= tolerance and not cmp["non_float_mismatch"], cmp
    return cmp


def submit(
    slurm_env, run_dir: Path, *flags: str, script=("examples/train.py",), wait=True, plan=PLAN_FLAGS, timeout=240
):
    args = ["slurm", "submit", *plan, "--run-dir", str(run_dir), *flags]
    args += ["--wait"] if wait else []
    return run_cli(*args, "--", *script, timeout=timeout, env=slurm_env)


def job_output(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no output yet)"


def job_id_of(r) -> str:
    assert r.stdout.strip(), f"no job id on stdout:\n{r.stderr}"
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), r.stdout
    return job_id


def _sleeper(slurm_env, run_dir: Path) -> str:
    """Submit tests/scripts/slurm_sleep.py; its job id once it is asleep (its handlers installed)."""
    flags = ("--nproc-per-node", "1", "--global-batch-size", "1", "--run-dir", str(run_dir))
    r = run_cli("slurm", "submit", *flags, "--", "tests/scripts/slurm_sleep.py", env=slurm_env)
    assert r.returncode == 0, r.stderr
    job_id = job_id_of(r)
    deadline = time.monotonic() + 60
    while "sleeping" not in job_output(run_dir, job_id):
        assert time.monotonic() < deadline, job_output(run_dir, job_id)
        time.sleep(0.2)
    return job_id


def _wait_final(slurm_env, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = run_cli("slurm", "status", job_id, "--json", env=slurm_env)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        if status["final"] or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def train_args(run_dir: Path) -> tuple[str, ...]:
    """examples/train.py on the example task (slowed down by GRADACCUM_TEST_MICRO_STEP_DELAY), restartable."""
    return (
        "examples/train.py", "--task", "tests.scripts.slow_task:task", "--steps", str(STEPS),
        "--output", str(run_dir / "final.pt"), "--checkpoint-dir", str(run_dir / "ckpt"), "--resume", "auto",
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory):
    """A 2-task job (one srun task per process) training the example; its run directory."""
    run_dir = tmp_path_factory.mktemp("slurm-2task")
    r = submit(slurm_env, run_dir, "--nproc-per-node", "2", script=train_args(run_dir))
    job_id = job_id_of(r)
    assert r.returncode == 0, f"{r.stderr}\n{job_output(run_dir, job_id)}"
    return run_dir, job_id


@pytest.mark.timeout(300)
def test_two_task_job_matches_reference(uninterrupted):
    run_dir, job_id = uninterrupted
    out = job_output(run_dir, job_id)
    assert "DDP gloo on 2 process(es) (slurm)" in out, out
    assert (run_dir / "job.sbatch").exists() and (run_dir / "job_id").read_text().strip() == job_id
    assert json.loads((run_dir / "plan.json").read_text())["gradient_accumulation_steps"] == 2
    assert_matches(run_dir / "final.pt")


@pytest.mark.timeout(300)
def test_fsdp_job_matches_reference(slurm_env, tmp_path):
    """The trainer backend is the script's choice: --backend fsdp needs no launcher flag."""
    run_dir = tmp_path / "fsdp"
    script = ("examples/train.py", "--backend", "fsdp", "--steps", str(STEPS), "--output", str(run_dir / "final.pt"))
    r = submit(slurm_env, run_dir, "--nproc-per-node", "2", script=script)
    job_id = job_id_of(r)
    out = job_output(run_dir, job_id)
    assert r.returncode == 0, f"{r.stderr}\n{out}"
    assert "FSDP2 gloo on 2 process(es) (slurm)" in out, out
    assert_matches(run_dir / "final.pt")  # the shards gathered into the model's own state_dict


def run_concurrently(slurm_env, tmp_path: Path, shapes: dict[str, tuple[str, ...]]) -> dict[str, tuple]:
    """Submit one training job per entry at once, wait for all; {name: (run_dir, status, output)}."""
    runs = {}
    for name, flags in shapes.items():
        run_dir = tmp_path / name
        r = submit(slurm_env, run_dir, *flags, script=train_args(run_dir), wait=False)
        assert r.returncode == 0, r.stderr
        runs[name] = (run_dir, job_id_of(r))
    done = {}
    for name, (run_dir, job_id) in runs.items():
        status = _wait_final(slurm_env, job_id, timeout_s=240)
        done[name] = (run_dir, status, job_output(run_dir, job_id))
    return done


@pytest.mark.timeout(300)
@pytest.mark.deepspeed
def test_one_node_two_processes_torchrun_and_deepspeed(slurm_env, tmp_path):
    shapes = {m: ("--launch", m, "--nproc-per-node", "2") for m in ("torchrun", "deepspeed")}
    for name, (run_dir, status, out) in run_concurrently(slurm_env, tmp_path, shapes).items():
        assert status["state"] == "COMPLETED", f"{name}: {status}\n{out}"
        who = "torchrun" if name == "torchrun" else "slurm"  # DeepSpeed's slurm launcher runs srun tasks
        assert f"DDP gloo on 2 process(es) ({who})" in out, out
        assert_matches(run_dir / "final.pt")
    assert (tmp_path / "deepspeed" / "deepspeed.json").exists()


@pytest.mark.timeout(300)
def test_two_nodes_torchrun_and_srun_match_reference(slurm_env, tmp_path):
    """n1 and n2 share this machine: only NodeAddr (127.0.0.1) makes the master reachable."""
    shapes = {m: ("--launch", m, "--nodes", "2", "--nproc-per-node", "1") for m in ("torchrun", "srun")}
    for name, (run_dir, status, out) in run_concurrently(slurm_env, tmp_path, shapes).items():
        assert status["state"] == "COMPLETED", f"{name}: {status}\n{out}"
        assert status["nodes"] == "n[1-2]", status
        assert f"DDP gloo on 2 process(es) ({'torchrun' if name == 'torchrun' else 'slurm'})" in out, out
        assert "gradaccum preflight [n2]" in out and "gradaccum preflight [n1]" in out, out
        assert "gradaccum: master 127.0.0.1:" in out, out  # n1's NodeAddr: the name n1 does not resolve
        assert_matches(run_dir / "final.pt")


@pytest.mark.timeout(360)
def test_preemption_checkpoints_requeues_and_resumes(slurm_env, tmp_path, uninterrupted):
    """USR1 to the batch script -> forwarded -> checkpoint after an agreed step -> requeue -> resume."""
    env = {**slurm_env, "GRADACCUM_TEST_MICRO_STEP_DELAY": "0.25"}  # about 0.5 s a step: time to signal
    r = submit(env, tmp_path, "--nproc-per-node", "2", script=train_args(tmp_path), wait=False)
    assert r.returncode == 0, r.stderr
    job_id = job_id_of(r)
    deadline = time.monotonic() + 180
    while not re.search(r"^step 1 ", job_output(tmp_path, job_id), re.M):
        assert time.monotonic() < deadline, f"no step 1 within 180 s:\n{job_output(tmp_path, job_id)}"
        time.sleep(0.1)
    signal = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert signal.returncode == 0, signal.stderr
    status = _wait_final(slurm_env, job_id, timeout_s=240)
    out = job_output(tmp_path, job_id)
    assert status["state"] == "COMPLETED" and status["restarts"] == 1, f"{status}\n{out}"
    assert "gradaccum: SIGUSR1 received, forwarding it to the workers" in out, out
    stopped = re.search(r"stopped after step (\d+) on request", out)
    assert stopped and 1 <= int(stopped[1]) < STEPS, out
    assert f"gradaccum: pre-empted: requeueing job {job_id}" in out, out
    assert "gradaccum: job " + job_id + " on n1, restart 1" in out, out  # --open-mode=append kept run 1 too
    assert re.search(rf"resumed from \S*step_0*{stopped[1]} at step {stopped[1]}", out), out
    # The same weights as the run that was never interrupted (same plan, same world), and the reference.
    import torch

    assert_matches(tmp_path / "final.pt", torch.load(uninterrupted[0] / "final.pt", weights_only=True), 1e-7)
    assert_matches(tmp_path / "final.pt")


@pytest.mark.timeout(120)
def test_requeue_current_job_from_rank_0(slurm_env, tmp_path):
    """launcher.slurm.requeue_current_job(), as a trainer's rank 0 calls it: same job id, restart count 1."""
    code = (
        "import os, time; from launcher.slurm import requeue_current_job; "
        "n = os.environ.get('SLURM_RESTART_COUNT', '0'); print('restart', n, flush=True); "
        "n == '0' and requeue_current_job() and time.sleep(60)"
    )
    r = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "--open-mode=append", f"--output={tmp_path}/out",
         f"--wrap={os.sys.executable} -c {shlex.quote(code)}"],
        capture_output=True, text=True, env={**os.environ, **slurm_env},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    status = _wait_final(slurm_env, job_id, timeout_s=100)
    out = (tmp_path / "out").read_text()
    assert status["state"] == "COMPLETED" and status["restarts"] == 1, (status, out)
    assert "restart 0" in out and "restart 1" in out, out


@pytest.mark.timeout(180)
def test_status_and_cancel_a_running_job(slurm_env, tmp_path):
    job_id = _sleeper(slurm_env, tmp_path)
    status = json.loads(run_cli("slurm", "status", job_id, "--json", env=slurm_env).stdout)
    assert status["job_id"] == job_id and status["state"] == "RUNNING" and not status["final"], status
    assert status["stdout"] == str(tmp_path / f"slurm-{job_id}.out")
    r = run_cli("slurm", "cancel", job_id, env=slurm_env)
    assert r.returncode == 0, r.stderr
    status = _wait_final(slurm_env, job_id)
    assert status["state"] == "CANCELLED", status
    r = run_cli("slurm", "status", job_id, env=slurm_env)
    assert r.returncode == 0 and "CANCELLED" in r.stdout
    r = run_cli("slurm", "cancel", "999999", env=slurm_env)
    assert r.returncode == 2 and "Slurm knows no job 999999" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(180)
def test_term_to_the_batch_script_reaches_the_workers(slurm_env, tmp_path):
    job_id = _sleeper(slurm_env, tmp_path)
    r = subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env={**os.environ, **slurm_env})
    assert r.returncode == 0
    status = _wait_final(slurm_env, job_id)
    out = job_output(tmp_path, job_id)
    assert "gradaccum: SIGTERM received, forwarding it to the workers" in out, out
    assert "got SIGTERM" in out, out
    assert status["state"] == "COMPLETED", (status, out)  # the worker exited 0 after its handler ran


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--partition", "nosuch", "--nproc-per-node", "1"), ["Slurm rejected the job", "partitions here: debug"]),
        (("--nodes", "5", "--nproc-per-node", "1"), ["Slurm rejected the job", "5 node(s)", "debug: 2 node(s)"]),
    ],
)
def test_submit_errors_are_clear(slurm_env, tmp_path, flags, expected):
    r = submit(slurm_env, tmp_path, *flags, wait=False, plan=("--global-batch-size", "10", "--micro-batch-size", "2"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr
    assert not (tmp_path / "job_id").exists()


def test_submit_without_slurm_is_a_clear_error(tmp_path):
    env = {"PATH": str(Path(os.sys.executable).parent) + ":/nonexistent"}
    r = run_cli("slurm", "submit", "--nproc-per-node", "1", "--global-batch-size", "1", "--run-dir", str(tmp_path),
                "--", "tests/scripts/slurm_sleep.py", env=env)  # fmt: skip
    assert r.returncode == 2 and "Slurm is not installed here" in r.stderr, r.stderr


@pytest.mark.timeout(120)
def test_preflight_fails_fast_when_the_master_port_is_taken(slurm_env, tmp_path):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**slurm_env, "GRADACCUM_MASTER_PORT": str(port)}
        r = submit(env, tmp_path, "--nproc-per-node", "1", script=train_args(tmp_path))
    job_id = job_id_of(r)
    out = job_output(tmp_path, job_id)
    assert r.returncode == 2, f"{r.stderr}\n{out}"
    assert f"port {port} is already in use on the master node" in out, out
    assert not (tmp_path / "final.pt").exists()


def _free_port_run(count: int) -> int:
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(_bindable(base + i) for i in range(count + 1)):
            return base
    raise RuntimeError("no run of free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(240)
def test_local_cluster_script_lifecycle(tmp_path):
    """A second, private cluster: up is idempotent, --nodes reshapes it, down stops exactly its daemons."""
    state = tmp_path / "cluster"
    env = {"GRADACCUM_SLURM_DIR": str(state), "GRADACCUM_SLURM_PORT": str(_free_port_run(3))}
    script = ["bash", str(CLUSTER_SCRIPT)]

    def sh(*args, check=True):
        r = subprocess.run([*script, *args], capture_output=True, text=True, timeout=180, env={**os.environ, **env})
        assert not check or r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    try:
        conf = cluster_up(1, env)
        assert conf == f"{state}/etc/slurm.conf"
        pids = {p.name: p.read_text().strip() for p in (state / "run").glob("*.pid")}
        assert set(pids) == {"munged.pid", "slurmctld.pid", "slurmd.n1.pid"}
        again = sh("up")
        assert again.stdout.strip().splitlines()[-1] == f"export SLURM_CONF={conf}"
        assert "already up" in again.stderr
        assert {p.name: p.read_text().strip() for p in (state / "run").glob("*.pid")} == pids  # not restarted
        assert "n1" in sh("status").stdout
        assert cluster_up(2, env) == conf
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                               env={**os.environ, "SLURM_CONF": conf}).stdout.split("\n")  # fmt: skip
        assert sorted(n for n in nodes if n) == ["n1 idle", "n2 idle"]
        pids = [p.read_text().strip() for p in (state / "run").glob("*.pid")]
        assert len(pids) == 4
    finally:
        sh("down", check=False)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "slurm" not in Path(f"/proc/{pid}/comm").read_text()
    assert sh("status", check=False).returncode == 3
    assert sh("up", "--nodes", "0", check=False).returncode != 0


def test_master_is_the_first_nodes_node_addr_and_hostfile_lists_the_job_nodes(slurm_env, tmp_path):
    from launcher.env import SLURM_PORT_BASE
    from launcher.slurm_job import master

    environ = {**os.environ, **slurm_env, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n1"}
    addr, port = master(environ)
    assert addr == "127.0.0.1"  # NodeAddr of n1 in slurm.conf; `n1` itself does not resolve
    assert SLURM_PORT_BASE + 7 <= port < SLURM_PORT_BASE + 7 + 64
    r = subprocess.run(
        [os.sys.executable, "-m", "launcher.slurm_job", "hostfile", "--slots", "2", "--output", str(tmp_path / "h")],
        env=environ,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h").read_text() == "n1 slots=2\nn2 slots=2\n"


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpirun_inside_sbatch_takes_ranks_from_mpi_not_slurm(slurm_env, tmp_path):
    """mpirun in a batch step leaves SLURM_PROCID=0 in every rank: launcher.env must prefer OMPI_*."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is missing: install OpenMPI (make os-deps)")
    gradaccum = str(Path(os.sys.executable).parent / "gradaccum")
    wrap = (
        f"mpirun --allow-run-as-root --oversubscribe -np 2 sh -c "
        f"'{gradaccum} env --json > {tmp_path}/env-$OMPI_COMM_WORLD_RANK.json'"
    )
    r = subprocess.run(
        ["sbatch", "--wait", "--ntasks=2", "--nodes=1", f"--output={tmp_path}/out", "--wrap", wrap],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, **slurm_env},
    )
    assert r.returncode == 0, (r.stderr, (tmp_path / "out").read_text() if (tmp_path / "out").exists() else "")
    seen = [json.loads((tmp_path / f"env-{i}.json").read_text()) for i in range(2)]
    assert [(s["launcher"], s["rank"], s["world_size"]) for s in seen] == [("openmpi", 0, 2), ("openmpi", 1, 2)]
    assert seen[0]["hosts"] == ["n1"]
