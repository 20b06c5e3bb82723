"""A rank that dies mid-run ends the whole launch, non-zero, naming the rank and its exit
code, with no process left behind; signals to `gradaccum launch` reach every worker."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import REPO, gradaccum_argv
from tests.markers import by_tool

PROBE = REPO / "tests" / "scripts" / "dist_probe.py"
PLAN_FLAGS = ["--global-batch-size", "8", "--micro-batch-size", "2"]

pytestmark = pytest.mark.slow


class Launch:
    """`gradaccum launch` running dist_probe in an endless all-reduce loop."""

    def __init__(self, tmp_path, launcher, *flags):
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.log_path = tmp_path / "launch.log"
        argv = gradaccum_argv(
            "launch", "--launcher", launcher, *PLAN_FLAGS, *flags, "--run-dir", str(tmp_path / "run"), "--"
        )
        argv += [str(PROBE), str(self.out), "--steps", "1000000000", "--sleep", "0.02"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_workers(self, timeout=120.0) -> dict[int, int]:
        """Rank -> pid, once both ranks have joined the process group."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"launch ended early ({self.proc.returncode}):\n{self.log[-4000:]}")
            files = [self.out / f"pid-{rank}" for rank in range(2)]
            if all(f.exists() and f.read_text() for f in files):
                time.sleep(0.5)  # well inside the all-reduce loop
                return {rank: int(f.read_text()) for rank, f in enumerate(files)}
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"workers did not start within {timeout} s:\n{self.log[-4000:]}")

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def wait(self, timeout=60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launch still running {timeout} s after the failure:\n{self.log[-4000:]}")

    def kill(self) -> None:
        for p in reversed(self.processes()):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


def assert_all_gone(processes: list[psutil.Process], grace_s=15.0) -> None:
    deadline = time.monotonic() + grace_s
    alive = processes
    while time.monotonic() < deadline:
        alive = [p for p in processes if _alive(p)]
        if not alive:
            return
        time.sleep(0.2)
    for p in alive:
        p.kill()
    pytest.fail(f"left behind: {[(p.pid, p.name()) for p in alive]}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# launcher, flags, what its output must say about rank 1 killed by SIGKILL
CASES = {
    "local": (("--nproc-per-node", "2"), r"worker rank 1 \(pid \d+\) failed: killed by signal 9 \(SIGKILL\)"),
    "torchrun": (("--nproc-per-node", "2"), r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9"),
    "mpirun": (
        ("--nproc-per-node", "2", "--oversubscribe"),
        r"process rank 1 with PID \d+ on node \S+ exited on signal 9",
    ),
    # DeepSpeed's launcher reports the first process it sees exit, printing the last spawned
    # command (local_rank=1) whichever it was: rank 1's -9, or rank 0's 1 when rank 0 noticed
    # the dead peer ("Connection reset by peer") and exited before DeepSpeed's next poll.
    "deepspeed": (("--nproc-per-node", "2"), r"--local_rank=1'.*exits with return code = (-9|1)\b"),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", by_tool(CASES))
def test_sigkill_one_rank_stops_the_launch(launcher, tmp_path):
    flags, says = CASES[launcher]
    launch = Launch(tmp_path, launcher, *flags)
    pids = launch.wait_for_workers()
    everything = launch.processes()
    assert {pids[0], pids[1]} <= {p.pid for p in everything}
    psutil.Process(pids[1]).send_signal(signal.SIGKILL)
    status = launch.wait()
    log = launch.log
    assert status != 0, log[-4000:]
    assert re.search(says, log, re.S), f"output does not name rank 1 and its exit code:\n{log[-4000:]}"
    assert_all_gone(everything)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher, sig", [("local", signal.SIGTERM), ("torchrun", signal.SIGINT)])
def test_signal_to_the_launch_reaches_every_worker(launcher, sig, tmp_path):
    launch = Launch(tmp_path, launcher, "--nproc-per-node", "2")
    launch.wait_for_workers()
    everything = launch.processes()
    launch.proc.send_signal(sig)
    status = launch.wait()
    assert status != 0, launch.log[-4000:]
    assert_all_gone(everything)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", by_tool(CASES))
def test_workers_die_with_a_sigkilled_launch(launcher, tmp_path):
    """SIGKILL (or the OOM killer) on `gradaccum launch` runs no cleanup in it; the
    parent-death signal and the watchdog must still take every worker down."""
    flags, _ = CASES[launcher]
    launch = Launch(tmp_path, launcher, *flags)
    pids = launch.wait_for_workers()
    everything = launch.processes()
    assert {pids[0], pids[1]} <= {p.pid for p in everything}
    launch.proc.send_signal(signal.SIGKILL)
    launch.proc.wait()
    assert_all_gone(everything, grace_s=30.0)


def test_run_dir_naming_an_existing_file_exits_2_in_one_line(tmp_path):
    from tests.conftest import run_cli

    taken = tmp_path / "not-a-dir"
    taken.write_text("x")
    r = run_cli(
        "launch", "--launcher", "local", "--nproc-per-node", "1", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--run-dir", str(taken), "--", "examples/train.py", "--steps", "1",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"run directory {taken} exists and is not a directory" in r.stderr
    assert taken.read_text() == "x"
