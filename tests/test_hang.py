"""A rank that stops answering ends the job with a message naming it; mismatched ranks refuse to start.

The real checks start 2 worker processes under torchrun (gloo): one sleeps inside a
micro-step, or builds a different dataset. The task functions the workers load
(`--task tests.test_hang:...`) live here, next to the tests that use them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, processes_naming, run_cli

SLEEP_RANK = "GRADACCUM_TEST_SLEEP_RANK"
SLEEP_AT_CALL = "GRADACCUM_TEST_SLEEP_AT_CALL"
SLEEP_MARK = "GRADACCUM_TEST_SLEEP_MARK"


# ------------------------------------------------------------ tasks the workers load
def sleeping_task():
    """The MLP task; rank $SLEEP_RANK sleeps (for good) in its loss call number $SLEEP_AT_CALL."""
    from trainers.example import mlp_task

    task = mlp_task()
    inner, calls = task.loss, [0]

    def loss(model, batch):
        calls[0] += 1
        if os.environ.get("RANK") == os.environ.get(SLEEP_RANK) and calls[0] == int(os.environ[SLEEP_AT_CALL]):
            Path(os.environ[SLEEP_MARK]).write_text(str(time.time()))
            time.sleep(3600)  # a dead-locked data loader, a stuck collective: this rank never arrives
        return inner(model, batch)

    task.loss = loss
    return task


def rank_dependent_dataset_task():
    """Rank 1 filters one item out of its dataset: the classic cause of a hang at the epoch's end."""
    from trainers.example import mlp_task

    return mlp_task(n=95 if os.environ.get("RANK") == "1" else 96)


def torchrun_worker(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    argv += ["-m", "trainers.worker", "--output-dir", str(tmp_path / "steps"), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    full_env.pop("GRADACCUM_PLAN", None)
    full_env.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


# ------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sleeping_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path):
    timeout_s = 5.0
    mark = tmp_path / "sleep-started"
    # plan: global 16 = micro 4 × accumulation 2 × 2 ranks; call 4 is step 2, micro-step 2/2
    result = torchrun_worker(
        tmp_path,
        "--task=tests.test_hang:sleeping_task",
        "--steps=4",
        "--global-batch-size=16",
        "--micro-batch-size=4",
        f"--collective-timeout={timeout_s}",
        env={SLEEP_RANK: "1", SLEEP_AT_CALL: "4", SLEEP_MARK: str(mark)},
    )
    ended = time.time()
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert mark.exists(), out
    # The job ends when the watchdog fires, not when torchrun or pytest gives up: within the
    # timeout plus a margin for the poll interval, process teardown and a loaded machine.
    assert ended - float(mark.read_text()) < timeout_s + 40, out
    lines = [line for line in out.splitlines() if "gradaccum watchdog" in line]
    assert lines, out
    # Whichever rank speaks first, it names rank 1 as the one that did not arrive, and where.
    assert any("Rank(s) that did not arrive: 1 (rank 1 at step 2, micro-step 2/2, forward" in line for line in lines), (
        out
    )
    assert "exitcode  : 124" in out or "exit status 124" in out or "exitcode: 124" in out, out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ranks_with_different_datasets_refuse_to_start(tmp_path):
    result = torchrun_worker(
        tmp_path,
        "--task=tests.test_hang:rank_dependent_dataset_task",
        "--steps=3",
        "--global-batch-size=16",
        "--micro-batch-size=4",
        "--collective-timeout=30",
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "the ranks disagree about the work" in out, out
    assert "dataset_length: 96 on rank 0; 95 on rank 1" in out, out
    assert "WorkMismatch" not in out, out  # a clear message from each worker, not their tracebacks
    assert not (tmp_path / "steps" / "step-000001.pt").exists()  # no step was taken


def test_bad_collective_timeout_exits_2_before_anything_starts(tmp_path):
    result = run_cli("verify", "--collective-timeout", "0", "--output-dir", str(tmp_path / "v"))
    assert result.returncode == 2, result.stderr
    assert "--collective-timeout must be a positive number of seconds, got 0.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "v").exists()


# ------------------------------------------------------------------- pure functions
def _pos(step, seq, micro, phase, k=3, t=100.0):
    return {"step": step, "seq": seq, "micro_step": micro, "micro_steps": k, "phase": phase, "time": t}


def test_report_names_the_rank_behind_the_others():
    from trainers.distributed import hang_report

    waiting = _pos(2, 9, 2, "backward")
    positions = {0: waiting, 1: _pos(2, 4, 1, "forward"), 2: waiting}
    text = hang_report(0, 3, 5.0, 5.2, dict(waiting, host="n0"), positions, now=100.5, stale_s=10)
    assert (
        "no progress for 5.2 s (collective timeout 5 s) at step 2, micro-step 3/3, backward + gradient all-reduce"
        in (text)
    )
    assert "Rank(s) that did not arrive: 1 (rank 1 at step 2, micro-step 2/3, forward)" in text
    assert "This rank is one of them" not in text
    assert "Exiting with status 124" in text
    mine = hang_report(1, 3, 5.0, 6.0, positions[1], positions, now=100.5, stale_s=10)
    assert "This rank is one of them: the others are waiting for it." in mine


def test_report_names_silent_and_missing_ranks_and_same_point_hangs():
    from trainers.distributed import hang_report, missing_ranks

    here = _pos(3, 2, None, "totals", t=200.0)
    gone = _pos(3, 2, None, "totals", t=150.0)  # arrived, then its process vanished
    missing = missing_ranks({0: here, 1: gone, 2: None}, 3, now=200.0, stale_s=10)
    assert set(missing) == {1, 2}
    assert "last heard 50 s ago" in missing[1]
    assert "never reported" in missing[2]
    same = hang_report(0, 2, 5, 5, here, {0: here, 1: dict(here)}, now=200.0, stale_s=10)
    assert "Every rank reached the same point" in same
    unreachable = hang_report(0, 2, 5, 5, here, None, now=200.0, stale_s=10)
    assert "could not be read" in unreachable


def test_mismatch_message_groups_ranks_by_value():
    from trainers.distributed import describe_mismatch

    same = {"plan": {"global_batch_size": 16, "precision": "fp32"}, "dataset_length": 96, "steps": 4}
    assert describe_mismatch([same, dict(same), dict(same)]) is None
    other_plan = {"plan": {"global_batch_size": 16, "precision": "bf16"}, "dataset_length": 96, "steps": 5}
    text = describe_mismatch([same, other_plan, same])
    assert 'plan.precision: "fp32" on ranks 0, 2; "bf16" on rank 1' in text
    assert "steps: 4 on ranks 0, 2; 5 on rank 1" in text
    assert "dataset_length" not in text


# ------------------------------------------------------- a peer that never arrives
def lone_rank(tmp_path: Path, rank: int, port: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Rank `rank` of 2 started alone (its peer never comes): (result, seconds it ran)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for name in ("GRADACCUM_PLAN", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(name, None)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    argv = [sys.executable, str(REPO / "examples" / "train.py"), "--global-batch-size=8", "--micro-batch-size=2"]
    argv += ["--steps=1", "--output", str(tmp_path / "final.pt"), *args]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=150, env=env, cwd=REPO)
    return result, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("rank", "missing"), [(0, "rank 1 never arrived"), (1, "rank 0 never arrived")])
def test_a_rank_whose_peer_never_arrives_exits_within_the_timeout_naming_it(tmp_path, port, rank, missing):
    result, seconds = lone_rank(tmp_path, rank, port, "--collective-timeout=4")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line: no traceback, no C++ frames
    assert f"train.py (rank {rank}): error: rendezvous at 127.0.0.1:{port}: rank {rank} of 2 waited 4 s" in lines[0]
    assert missing in lines[0]
    # the 4 s bound, plus starting Python and importing torch on a loaded machine
    assert seconds < 4 + 60, seconds
    assert not (tmp_path / "final.pt").exists()
    assert processes_naming(str(tmp_path)) == []


def test_the_rendezvous_names_every_rank_that_did_not_come(port):
    """In-process, rank 0 of 3 alone: ranks 1 and 2 are named, with the address and port."""
    from trainers.rendezvous import RendezvousTimeout, rendezvous

    started = time.monotonic()
    with pytest.raises(RendezvousTimeout) as error:
        rendezvous(0, 3, "127.0.0.1", port, 1.0)
    assert time.monotonic() - started < 10
    assert f"rendezvous at 127.0.0.1:{port}: rank 0 of 3 waited 1 s and ranks 1, 2 never arrived" in str(error.value)


def test_the_rendezvous_is_bounded_by_default():
    """No --collective-timeout: the stated default bounds the rendezvous (docs/precision-and-hangs.md)."""
    from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DEFAULT_RENDEZVOUS_TIMEOUT_S

    assert DEFAULT_RENDEZVOUS_TIMEOUT_S == DEFAULT_COLLECTIVE_TIMEOUT_S == 300
    docs = (REPO / "docs" / "precision-and-hangs.md").read_text()
    assert "waits 300 s for a missing peer" in docs
