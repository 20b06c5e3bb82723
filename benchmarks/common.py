"""What every benchmark shares: robust statistics, targets, the machine, starting processes.

Torch-free on purpose: the driver (`python -m benchmarks`) imports this, and the launch
benchmark times CLI commands that must not pay for torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------- statistics
def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements (min, max, interquartile range)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples to summarise")
    if len(xs) >= 4:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1, q3 = xs[0], xs[-1]
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "n": len(xs),
        "samples": xs,
    }


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Per-repetition ratios (each pair measured back to back), summarised.

    Pairing cancels slow drifts of a shared machine: a repetition that ran while someone
    else's tests were busy slows both sides.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"unpaired samples: {len(numerator)} vs {len(denominator)}")
    return summary([a / b for a, b in zip(numerator, denominator, strict=True)])


def shuffled(names: Sequence[str], rng: random.Random) -> list[str]:
    """The contenders' order for one round: shuffled, so that none always follows the same one
    (a fixed rotation would always put the same predecessor, and its after-effects, before it)."""
    order = list(names)
    rng.shuffle(order)
    return order


# ----------------------------------------------------------------------- targets
@dataclasses.dataclass
class Target:
    """A published goal: `value op limit`, e.g. ours / hand loop <= 1.02."""

    name: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    what: str
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


# ----------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """What the figures were measured on (the load average says how shared it was)."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_at_start": list(os.getloadavg()),
    }
    info["packages"] = _versions("torch", "accelerate", "lightning", "deepspeed")
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is a dependency; keep the report going anyway
        pass
    return info


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the trainers or launcher had uncommitted edits."""

    def git(*args: str) -> str:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return proc.stdout if proc.returncode == 0 else ""

    # porcelain lines are "XY path": the status may start with a space, so no strip before slicing
    dirty = git("status", "--porcelain", "--", "trainers", "launcher", "benchmarks", "examples")
    uncommitted = [line[3:] for line in dirty.splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": uncommitted}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions(*names: str) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------- processes
def child_env(**extra: str) -> dict[str, str]:
    """The environment for benchmark children: repo importable, one thread per process.

    One intra-op thread per rank for every contender: two ranks on two cores, and no
    contender gets more threads than another.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _start(argv: Sequence[str], env: dict[str, str] | None, stderr: int) -> subprocess.Popen:
    """A command in its own session (so its whole group can be killed), from the repo root."""
    return subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env or child_env(),
        cwd=REPO,
        start_new_session=True,
    )


def run_checked(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; return stdout, or raise with the tail of stderr."""
    proc = _start(argv, env, subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise RuntimeError(f"{' '.join(argv[:6])} ... did not finish within {timeout:.0f} s\n{err[-3000:]}") from None
    finally:
        _kill_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited with {proc.returncode}\n{err[-3000:]}")
    return out


def time_command(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120) -> float:
    """Wall seconds from start to exit of a command that must succeed."""
    t0 = time.perf_counter()
    run_checked(argv, timeout, env)
    return time.perf_counter() - t0


def time_to_line(argv: Sequence[str], prefix: str, env: dict[str, str] | None = None, timeout: float = 180) -> float:
    """Wall seconds from start until stdout prints a line starting with `prefix`; then stops it."""
    t0 = time.perf_counter()
    proc = _start(argv, env, subprocess.DEVNULL)
    try:
        deadline = t0 + timeout
        for line in proc.stdout:
            if line.startswith(prefix):
                return time.perf_counter() - t0
            if time.perf_counter() > deadline:
                break
        raise RuntimeError(f"{' '.join(argv[:6])} ... never printed a line starting with {prefix!r}")
    finally:
        # Let the run finish its few steps (a SIGTERM mid-rendezvous only adds noise to the next rep).
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc)
        proc.stdout.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """End what is left of a child's own process group (only ever one we started)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
