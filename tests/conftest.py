"""Shared test helpers: run the real CLI in a subprocess, pick free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def gradaccum_argv(*args: str) -> list[str]:
    """The installed console script when present, else `python -m launcher`."""
    script = BIN / "gradaccum"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "launcher", *args]


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None, cwd: str | Path | None = None):
    """Run `gradaccum ARGS` as a real process; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    return subprocess.run(
        gradaccum_argv(*args), capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def processes_naming(text: str) -> list[str]:
    """Live processes (not zombies) whose command line mentions `text`, such as a test's
    tmp_path: what a test would leave behind. Each as "pid: command line"."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if text in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmdline}")
    return found
