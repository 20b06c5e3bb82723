"""`make gpu-check` (benchmarks.gpu_check): without CUDA it refuses clearly and runs nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )


@pytest.mark.parametrize("args", [(), ("--only", "bf16"), ("--child-pinned-workers",)])
def test_refuses_without_cuda_and_runs_nothing(args):
    result = _run(*args)
    assert result.returncode == 2
    assert "no CUDA device here" in result.stderr and "Nothing was run" in result.stderr
    assert "Traceback" not in result.stderr
    assert "gpu-check:" not in result.stdout  # no check line: nothing ran


def test_unknown_check_is_exit_2():
    result = _run("--only", "nccl-world1,warp-drive")
    assert result.returncode == 2 and "unknown check(s) warp-drive" in result.stderr


def test_make_target_exists():
    makefile = (REPO / "Makefile").read_text()
    assert "gpu-check: venv\n\t$(BIN)/python -m benchmarks.gpu_check" in makefile
