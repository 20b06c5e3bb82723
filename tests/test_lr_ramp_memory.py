"""Pure planning helpers: LR rules, batch-size ramp, memory fit and micro-batch choice."""

from __future__ import annotations

import json
import math

import pytest

from launcher import BatchPlan
from launcher.lr import LRError, LRRule
from launcher.memory import GiB, MemoryError_, MemoryModel, MiB, choose_micro_batch_size, micro_options, parse_bytes
from launcher.ramp import BatchRamp, RampError
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "rule, base_lr, base_batch, global_batch, expected",
    [
        ("linear", 0.1, 256, 256, 0.1),
        ("linear", 0.1, 256, 8192, 3.2),  # Goyal et al.: 32 × the batch, 32 × the lr
        ("linear", 0.1, 256, 64, 0.025),
        ("sqrt", 1e-3, 64, 256, 2e-3),
        ("sqrt", 1e-3, 64, 16, 5e-4),
        ("none", 3e-4, None, 4096, 3e-4),
    ],
)
def test_lr_rules(rule, base_lr, base_batch, global_batch, expected):
    assert math.isclose(LRRule(rule, base_lr, base_batch).lr_for(global_batch), expected, rel_tol=1e-12)


def test_warmup_is_linear_to_the_scaled_peak():
    rule = LRRule("linear", 0.1, 256, warmup_steps=4)
    assert [round(rule.lr_at(s, 512), 6) for s in range(6)] == [0.05, 0.1, 0.15, 0.2, 0.2, 0.2]


def test_rescale_message_states_both_rates():
    msg = LRRule("linear", 0.1, 256).rescale_message(256, 512)
    assert "0.1 -> 0.2" in msg and "linear" in msg


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(rule="cubic"), "must be one of linear, sqrt, none"),
        (dict(rule="linear", base_lr=0.1), "needs --base-lr and --base-batch-size"),
        (dict(rule="sqrt", base_lr=-1.0, base_batch_size=8), "--base-lr must be a positive number"),
        (dict(rule="linear", base_lr=0.1, base_batch_size=0), "--base-batch-size must be a positive integer"),
        (dict(rule="none", warmup_steps=-1), "--warmup-steps"),
    ],
)
def test_lr_bad_input(kwargs, fragment):
    with pytest.raises(LRError, match=fragment):
        LRRule(**kwargs)


def test_plan_cli_prints_the_scaled_lr():
    r = run_cli(
        "plan",
        "--global-batch-size",
        "1024",
        "--world-size",
        "8",
        "--lr-scaling",
        "linear",
        "--base-lr",
        "0.1",
        "--base-batch-size",
        "256",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert math.isclose(json.loads(r.stdout)["lr"], 0.4)


# ------------------------------------------------------------------ batch ramp
def test_megatron_style_ramp_stages_are_valid_plans():
    final = BatchPlan.solve(64, 2, world_size=4)
    ramp = BatchRamp.parse("16:16:300", final)
    assert ramp.stages == ((0, 16), (100, 32), (200, 48), (300, 64))
    plans = [ramp.plan_at(s) for s in (0, 99, 100, 250, 10_000)]
    assert [p.gradient_accumulation_steps for p in plans] == [2, 2, 4, 6, 8]
    assert all(p.micro_batch_size == 2 and p.data_parallel_size == 4 for p in plans)


def test_ramp_consumes_exactly_the_scheduled_samples_and_resumes_mid_ramp():
    final = BatchPlan.solve(32, 2, world_size=2)
    ramp = BatchRamp.parse("8,16@40,32@100", final)
    sizes = ramp.batches(8)
    assert sizes == [8, 8, 8, 8, 8, 16, 16, 16]  # 40 samples at 8, then 16 until 100 ...
    consumed = sum(sizes[:5])
    assert consumed == 40
    # Resuming from the consumed-sample count gives the same continuation, at any world size.
    assert ramp.batches(3, consumed) == sizes[5:8]
    assert ramp.with_world_size(4).batches(3, consumed) == sizes[5:8]
    assert BatchRamp.from_dict(json.loads(json.dumps(ramp.to_dict()))) == ramp


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("12:16:300", "does not reach the global batch 64"),
        ("16,18@100,64@200", "ramp stage with global batch 18 is not a valid plan"),
        ("16,32", "cannot read batch ramp"),
        ("16,32@50,64@20", "increasing sample counts"),
        ("16,32@50", "ends at global batch 32"),
    ],
)
def test_ramp_errors(spec, fragment):
    with pytest.raises(RampError, match=fragment):
        BatchRamp.parse(spec, BatchPlan.solve(64, 2, world_size=4))


# ---------------------------------------------------------------------- memory
def test_fit_recovers_a_line_and_choice_is_the_largest_fitting_divisor():
    points = [(1, 1000 * MiB + 100 * MiB), (2, 1000 * MiB + 200 * MiB), (4, 1000 * MiB + 400 * MiB)]
    model = MemoryModel.fit(points)
    assert math.isclose(model.per_sample_bytes, 100 * MiB) and math.isclose(model.base_bytes, 1000 * MiB)
    # global 96 over dp 2: 48 per rank; usable 0.9 × 3 GiB = 2764.8 MiB -> micro <= 17.6 -> 16
    choice = choose_micro_batch_size(96, 2, model, 3 * GiB)
    assert (choice.micro_batch_size, choice.gradient_accumulation_steps) == (16, 3)
    bigger = choose_micro_batch_size(96, 2, model, 8 * GiB)
    assert bigger.micro_batch_size == 48 and bigger.gradient_accumulation_steps == 1
    assert [o.micro_batch_size for o in micro_options(96, 2, model, None)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(MemoryError_, match="even micro-batch 1 needs about"):
        choose_micro_batch_size(8, 1, MemoryModel(10 * GiB, GiB), 4 * GiB)


@pytest.mark.parametrize(
    "text, expected", [("512MiB", 512 * MiB), ("2GiB", 2 * GiB), ("1.5G", int(1.5 * GiB)), ("4096", 4096)]
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_plan_cli_memory_table_and_choice():
    r = run_cli(
        "plan",
        "--global-batch-size",
        "256",
        "--world-size",
        "8",
        "--memory-per-sample",
        "180MiB",
        "--memory-base",
        "2GiB",
        "--memory-budget",
        "8GiB",
    )
    assert r.returncode == 0, r.stderr
    assert "micro batch size (per rank)        16" in r.stdout
    assert "    32      1     7.62 GiB  no" in r.stdout
    r = run_cli("plan", "--global-batch-size", "256", "--world-size", "8", "--memory-per-sample", "lots")
    assert r.returncode == 2 and "cannot read memory size" in r.stderr
