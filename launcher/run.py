"""The one place that starts subprocesses: run a command, forward signals, return its status.

Children run in their own process group so that a signal to the launcher (Ctrl-C, Slurm's
TERM) reaches every worker, and so that a launcher that dies takes no orphan with it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def format_command(argv: Sequence[str]) -> str:
    """The command as a user would paste it into a shell."""
    return shlex.join(argv)


def _exit_status(returncode: int) -> int:
    # Popen reports death by signal N as -N; shells report 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def run_command(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout=None,
    stderr=None,
    kill_grace_s: float = 10.0,
) -> int:
    """Run `argv` (a list, never a shell string) and return its exit status.

    SIGINT/SIGTERM/SIGUSR1/SIGUSR2 received here are forwarded to the child's process
    group. If the child's group outlives the child, it is terminated, then killed after
    `kill_grace_s`, so that no worker is left behind.
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a list of arguments, not a shell string")
    full_env = dict(os.environ if env is None else env)
    proc = subprocess.Popen(list(argv), env=full_env, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    for sig in FORWARDED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: signals cannot be installed
            break
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _reap_group(proc.pid, kill_grace_s)
    return _exit_status(returncode)


def _reap_group(pgid: int, grace_s: float) -> None:
    """Terminate whatever is left in the child's process group."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    import time

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def capture_command(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run a short query command (`scontrol show hostnames ...`) and capture its text output.

    A missing program or a timeout comes back as a CompletedProcess with returncode 127 /
    124 and the reason on stderr, so callers handle one kind of failure.
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a list of arguments, not a shell string")
    try:
        return subprocess.run(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]}: no answer within {timeout} s")


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m MODULE ARGS` with this interpreter."""
    return [sys.executable, "-m", module, *args]


# ------------------------------------------------------------------ local workers
def describe_status(status: int) -> str:
    """`exit status 3` or `killed by signal 9 (SIGKILL)` for a shell-style status."""
    if status > 128:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {status - 128} ({name}), exit status {status}"
    return f"exit status {status}"


def _signal_groups(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def run_local_workers(
    argv: Sequence[str],
    nprocs: int,
    master_addr: str,
    master_port: int,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stop_grace_s: float = 10.0,
    log=None,
) -> int:
    """Start `nprocs` copies of `argv` on this machine with torchrun's variables, and wait.

    Each worker gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
    MASTER_ADDR, MASTER_PORT (what torchrun sets) and GRADACCUM_LAUNCHER=local. The first
    worker to fail (non-zero status or a signal) is named with its rank and status; the
    others get SIGTERM, then SIGKILL after `stop_grace_s`, so that no rank is left
    blocked in a collective. Returns 0, or the failing worker's shell-style status.
    """
    import time

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    base = dict(os.environ if env is None else env)
    workers: list[subprocess.Popen] = []
    interrupted: list[int] = []

    def forward(signum, _frame):
        interrupted.append(signum)
        _signal_groups([w.pid for w in workers], signum)

    previous = {}
    for sig in FORWARDED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            break
    try:
        for rank in range(nprocs):
            worker_env = dict(base)
            worker_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                GROUP_RANK="0",
                ROLE_RANK=str(rank),
                WORLD_SIZE=str(nprocs),
                LOCAL_WORLD_SIZE=str(nprocs),
                MASTER_ADDR=master_addr,
                MASTER_PORT=str(master_port),
                GRADACCUM_LAUNCHER="local",
            )
            # Own session per worker: a signal to its group also reaches its children
            # (data-loader processes) and nothing else.
            workers.append(subprocess.Popen(list(argv), env=worker_env, cwd=cwd, start_new_session=True))
        running = dict(enumerate(workers))
        while running:
            for rank, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[rank]
                status = _exit_status(code)
                if status != 0:
                    if interrupted:
                        log(f"gradaccum launch: interrupted; worker rank {rank} ended with {describe_status(status)}")
                    else:
                        log(
                            f"gradaccum launch: worker rank {rank} (pid {proc.pid}) failed: {describe_status(status)}; "
                            f"stopping the other {len(running)} worker(s)"
                        )
                    _stop(list(running.values()), stop_grace_s)
                    return 128 + interrupted[0] if interrupted else status
            time.sleep(0.05)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _reap_group(proc.pid, stop_grace_s)


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each worker's group, then SIGKILL what is still there after `grace_s`."""
    import time

    _signal_groups([p.pid for p in procs], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _signal_groups([p.pid for p in procs if p.poll() is None], signal.SIGKILL)
    for proc in procs:
        proc.wait()
