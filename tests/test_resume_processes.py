"""Interrupted and resized training with real processes (torchrun, gloo on CPU).

Every run trains the MLP task of trainers.example (global batch 12, micro 2) for 10 steps;
the uninterrupted 2-process run is the yardstick. At the same world size the resumed run
must give exactly its weights; at another world size the all-reduce sums in another
order, so within 1e-6 (relative, per tensor).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, run_cli
from trainers.checkpoint import latest_checkpoint, list_checkpoints, step_dir_name

STEPS = 10
TRAIN = ["examples/train.py", "--global-batch-size=12", "--micro-batch-size=2"]
MLP = "--task=trainers.example:mlp_task"
SLOW_MLP = "--task=resume_train:slow_task"  # the same arithmetic, with a pause in the loss
SCRIPT = "tests/scripts/resume_train.py"


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "GRADACCUM_PLAN"}
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "scripts")])
    return out


def torchrun(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if max_restarts:
        argv.append(f"--max-restarts={max_restarts}")
    return [*argv, *args]


def run(argv: list[str], timeout: float = 150, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**env(), **extra_env}, cwd=REPO)


class Run:
    """A run in the background, output in files (a pipe nobody reads could block it)."""

    def __init__(self, argv: list[str], logs: Path) -> None:
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env(), cwd=REPO)

    def wait_for(self, condition, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (status {self.proc.returncode}) too early:\n{self.err.read_text()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting:\n{self.err.read_text()}")
            time.sleep(0.01)

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill(self) -> None:
        """SIGKILL torchrun's agent and every worker at once: nobody cleans anything up."""
        workers = self.workers()
        for p in [psutil.Process(self.proc.pid), *workers]:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(workers, timeout=30)  # not the agent: Popen must reap its own child
        assert self.proc.wait() == -signal.SIGKILL


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max()) for k in a)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-for-bit equal: {different} (max rel diff {max_rel_diff(a, b):.3e})"


def losses(stdout: str) -> dict[int, float]:
    return {int(ln.split()[1]): float(ln.split()[3]) for ln in stdout.splitlines() if ln.startswith("step ")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
    out = tmp_path_factory.mktemp("uninterrupted") / "final.pt"
    r = run(torchrun(2, *TRAIN, MLP, f"--steps={STEPS}", f"--output={out}"))
    assert r.returncode == 0, r.stderr
    return load(out), losses(r.stdout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_during_a_save_and_at_a_random_moment_then_resume_is_bit_for_bit(tmp_path, uninterrupted):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    s1 = rng.randint(2, 5)  # the checkpoint of this step is half-written when the run dies
    s2 = rng.randint(s1 + 1, 8)  # the second run dies at a random moment after this step's checkpoint
    print(f"seed {seed}: killed during the save of step {s1}, then after step {s2}")
    ckpt, out, marker = tmp_path / "ckpt", tmp_path / "final.pt", tmp_path / "in-save"
    args = [SCRIPT, f"--steps={STEPS}", f"--checkpoint-dir={ckpt}", f"--output={out}"]

    first = Run(torchrun(2, *args, f"--hang-in-save-at-step={s1}", f"--marker={marker}"), tmp_path / "first")
    first.wait_for(marker.exists)
    first.kill()
    assert (ckpt / f".tmp-{step_dir_name(s1)}").is_dir()  # the half-written save
    assert latest_checkpoint(ckpt).name == step_dir_name(s1 - 1)

    second = Run(torchrun(2, *args), tmp_path / "second")
    second.wait_for((ckpt / step_dir_name(s2)).exists)
    time.sleep(rng.uniform(0.0, 0.1))
    second.kill()
    assert f"resumed from {ckpt / step_dir_name(s1 - 1)}" in second.err.read_text()
    assert not out.exists(), "the second run finished before it could be killed"

    third = run(torchrun(2, *args))
    assert third.returncode == 0, third.stderr
    started = int(third.stderr.split("attempt 0: starting at step ")[1].split()[0])
    assert s2 <= started < STEPS
    assert not any(p.name.startswith(".tmp-") for p in ckpt.iterdir())
    assert_equal(uninterrupted[0], load(out))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_restarts_a_killed_worker_and_the_job_finishes_equal(tmp_path, uninterrupted):
    out = tmp_path / "final.pt"
    args = [SCRIPT, f"--steps={STEPS}", f"--checkpoint-dir={tmp_path / 'ckpt'}", f"--output={out}"]
    # Without it the restarted workers share the dead attempt's TCP store and may read its
    # gloo addresses: "Connection refused" in about half the runs here (see the README, "torchrun elastic restarts").
    r = run(torchrun(2, *args, "--die-at-step=4", max_restarts=1), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert r.returncode == 0, r.stderr
    assert "rank 1: SIGKILL to myself in step 4, micro-step 2" in r.stderr
    assert "attempt 1: starting at step 3" in r.stderr  # torchrun restarted both ranks, resumed from step 3
    assert_equal(uninterrupted[0], load(out))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigusr1_on_one_rank_then_resume_at_1_then_3_processes(tmp_path, uninterrupted):
    """SIGUSR1 to rank 1 only stops both ranks after the same step (one checkpoint, exit 0);
    the run then continues at 1 process, then at 3, keeping the global batch (2 -> 1 -> 3)."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    args = [*TRAIN, f"--checkpoint-dir={ckpt}", "--resume=auto"]
    job = Run(torchrun(2, *args, SLOW_MLP, f"--steps={STEPS}"), tmp_path / "job")
    job.wait_for(lambda: "step 2 " in job.out.read_text())
    (rank1,) = [p for p in job.workers() if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGUSR1)  # rank 0 is not told: the step-boundary all-reduce tells it
    assert job.proc.wait(timeout=120) == 0, job.err.read_text()
    stopped = int(job.err.read_text().split("stopped after step ")[1].split()[0])
    assert 2 <= stopped <= 6, "the stop took too long to arrive"
    # one checkpoint (no --checkpoint-every), written by both ranks together after that step
    assert [p.name for p in list_checkpoints(ckpt)] == [step_dir_name(stopped)]
    assert max(losses(job.out.read_text())) == stopped

    args += [MLP, "--checkpoint-every=1", "--keep-last=2"]
    one = run([sys.executable, *args, f"--steps={stopped + 2}"])  # one plain process
    three = run(torchrun(3, *args, f"--steps={STEPS}", f"--output={out}"))
    for r in (one, three):
        assert r.returncode == 0, r.stderr
    assert "accumulation 3 × data-parallel 2 at world size 2 -> global 12 = micro 2 × accumulation 6" in one.stderr
    assert "accumulation 6 × data-parallel 1 at world size 1 -> global 12 = micro 2 × accumulation 2" in three.stderr
    manifest = json.loads((ckpt / step_dir_name(STEPS) / "manifest.json").read_text())
    assert manifest["world_size"] == 3 and manifest["plan"]["gradient_accumulation_steps"] == 2
    # every step's loss as in the uninterrupted run, and the final weights
    seen = {**losses(job.out.read_text()), **losses(one.stdout), **losses(three.stdout)}
    assert sorted(seen) == list(range(1, STEPS + 1))
    assert all(abs(seen[s] - uninterrupted[1][s]) <= 1e-6 * abs(uninterrupted[1][s]) for s in seen)
    assert max_rel_diff(uninterrupted[0], load(out)) <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_verify_interrupt_and_resume_at_another_world_size(tmp_path):
    r = run_cli(
        "verify",
        "--json",
        MLP,
        "--global-batch-size=12",
        "--micro-batch-size=2",
        "--steps=4",
        "--interrupt-at-step=2",
        "--resume-nproc-per-node=1",
        f"--output-dir={tmp_path}",
        timeout=200,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["interrupted_at_step"] == 2 and report["world_sizes"] == [2, 1]
    assert report["interrupt_exit_status"] == 128 + signal.SIGKILL
    assert [s["world_size"] for s in report["steps"]] == [2, 2, 1, 1]
    assert report["resumed_plan"]["gradient_accumulation_steps"] == 6
    assert report["max_rel_diff"] <= 1e-6 and report["allreduce_rounds_per_step"] == 1
    assert "SIGKILL sent to the run" in r.stderr
