"""Micro-batch from a memory budget, measured on the real example LM in trial processes."""

from __future__ import annotations

import json

import pytest

from launcher.errors import UserError
from launcher.memory import MemoryModel, choose_micro_batch_size
from tests.conftest import run_cli
from trainers.autobatch import measure_peaks


@pytest.fixture(scope="module")
def fitted() -> MemoryModel:
    return MemoryModel.fit(measure_peaks("trainers.example:task", (1, 16)))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_measured_peaks_grow_with_the_micro_batch_and_the_budget_decides(fitted):
    # One trial process per size (a process's peak RSS cannot be reset).
    assert fitted.per_sample_bytes > 0
    assert 50 * 2**20 < fitted.base_bytes < 4 * 2**30  # torch + the model: tens to hundreds of MiB
    # Budgets between the estimates at micro 2 and 3, and far above: small picks small, large picks large.
    small = (fitted.estimate(2) + fitted.estimate(3)) / 2 / 0.9
    large = fitted.estimate(48) / 0.9 + 2**20
    assert choose_micro_batch_size(96, 2, fitted, small).micro_batch_size == 2
    with pytest.raises(UserError, match="even micro-batch 1 needs about"):
        choose_micro_batch_size(96, 2, fitted, fitted.estimate(1) / 2)
    big = choose_micro_batch_size(96, 2, fitted, large)
    assert (big.micro_batch_size, big.gradient_accumulation_steps) == (48, 1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plan_auto_then_training_with_it_matches_the_reference(tmp_path):
    r = run_cli(
        "plan",
        "--global-batch-size",
        "16",
        "--world-size",
        "2",
        "--micro-batch-size",
        "auto",
        "--task",
        "trainers.example:task",
        "--memory-budget",
        "64GiB",
        "--json",
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["micro_batch_size"] == 8 and plan["gradient_accumulation_steps"] == 1  # all of 16/2 fits
    assert "measured peak memory (cpu): micro 1:" in r.stderr and "fit: peak ≈" in r.stderr
    r = run_cli(
        "plan",
        "--global-batch-size",
        "16",
        "--world-size",
        "2",
        "--micro-batch-size",
        "auto",
        "--task",
        "trainers.example:task",
        "--memory-budget",
        "1MiB",
        timeout=240,
    )
    assert r.returncode == 2 and "even micro-batch 1 needs about" in r.stderr
    # The chosen micro-batch trains to the reference's weights.
    r = run_cli(
        "verify",
        "--global-batch-size",
        "16",
        "--micro-batch-size",
        str(plan["micro_batch_size"]),
        "--steps",
        "2",
        "--output-dir",
        str(tmp_path),
        "--json",
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
