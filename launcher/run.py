"""The one place that starts subprocesses: run a command, forward signals, return its status.

Children run in their own process group so that a signal to the launcher (Ctrl-C, Slurm's
TERM) reaches every worker, and so that a launcher that dies takes no orphan with it.

A launcher killed outright (SIGKILL, the OOM killer) runs no cleanup, so two mechanisms
that need none stand in for it on Linux:

- every child gets a parent-death signal (prctl PR_SET_PDEATHSIG, SIGTERM) before exec:
  workers stop, and torchrun / deepspeed / mpirun get the SIGTERM they stop their own
  workers on;
- a watchdog process, started first, holds the read end of a pipe only the launcher
  writes to. When the launcher dies the pipe closes; the watchdog then sends SIGTERM to
  every process of the children's sessions and every descendant of the children (torchrun
  starts its workers in sessions of their own), and SIGKILL to those still there after
  WATCHDOG_GRACE_S.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

#: Seconds between the watchdog's SIGTERM and its SIGKILL once the launcher has died.
WATCHDOG_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1

# The watchdog runs with `python -c`: it imports nothing of gradaccum, so it starts in
# milliseconds and works whatever sys.path the launcher had. Protocol on stdin: "+PID"
# when a child starts, "-PID" when it has been reaped; end of file when the launcher
# exits or dies. Linux only (/proc).
_WATCHDOG = r"""
import os, signal, sys, time
grace = float(sys.argv[1])
roots = set()
for line in sys.stdin:
    sign, pid = line[:1], int(line[1:])
    (roots.add if sign == "+" else roots.discard)(pid)
if not roots:
    sys.exit(0)
def table():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                out[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))  # ppid, pgid, sid
    return out
doomed = set()
def collect():
    procs = table()
    found = {p for p, (_, pgid, sid) in procs.items() if p in roots or pgid in roots or sid in roots}
    grew = True
    while grew:
        more = {p for p, (ppid, _, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    doomed.update(found)
    return found & set(procs)
def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
signal_all(collect(), signal.SIGTERM)
deadline = time.monotonic() + grace
while time.monotonic() < deadline:
    alive = collect()
    if not alive:
        sys.exit(0)
    signal_all(alive, signal.SIGTERM)
    time.sleep(0.1)
signal_all(collect(), signal.SIGKILL)
"""


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn that makes the child receive `sig` when this process dies (Linux).

    Set after fork and kept across exec. If this process died between the fork and the
    prctl, the child signals itself at once instead of waiting for a signal that was missed.
    """
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


class _Watchdog:
    """The launcher's side of the watchdog pipe (see the module docstring)."""

    def __init__(self, grace_s: float = WATCHDOG_GRACE_S) -> None:
        self.proc: subprocess.Popen | None = None
        if not sys.platform.startswith("linux"):
            return
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(grace_s)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                start_new_session=True,  # a signal to the launcher's group must not stop it first
            )
        except OSError:
            self.proc = None

    def _send(self, line: str) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def watch(self, pid: int) -> None:
        self._send(f"+{pid}")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}")

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=WATCHDOG_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
    watchdog = _Watchdog()
    try:
        proc = subprocess.Popen(
            list(argv),
            env=full_env,
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    except BaseException:
        watchdog.close()
        raise
    watchdog.watch(proc.pid)

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
        watchdog.forget(proc.pid)
        watchdog.close()
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


def local_worker_env(rank: int, nprocs: int, master_addr: str, master_port: int | str) -> dict[str, str]:
    """The variables the `local` launcher gives worker `rank` of `nprocs` (torchrun's set)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(nprocs),
        "LOCAL_WORLD_SIZE": str(nprocs),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "GRADACCUM_LAUNCHER": "local",
    }


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
    watchdog = _Watchdog()

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
            worker_env = {**base, **local_worker_env(rank, nprocs, master_addr, master_port)}
            # Own session per worker: a signal to its group also reaches its children
            # (data-loader processes) and nothing else.
            workers.append(
                subprocess.Popen(
                    list(argv), env=worker_env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent()
                )
            )
            watchdog.watch(workers[-1].pid)
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
            watchdog.forget(proc.pid)
        watchdog.close()


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
