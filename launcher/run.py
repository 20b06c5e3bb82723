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
