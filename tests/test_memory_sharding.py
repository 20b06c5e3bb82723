"""Planning knows sharding: model-state bytes per rank from --parameters (pure + the real CLI)."""

from __future__ import annotations

import json

import pytest

from launcher.memory import MemoryError_, parse_count, state_memory
from tests.conftest import run_cli

P = 1_000_000


def test_fp32_adam_replicated_is_16_bytes_per_parameter():
    s = state_memory(P, 4)
    assert (s.parameter_bytes, s.gradient_bytes, s.optimizer_bytes) == (4 * P, 4 * P, 8 * P)
    assert s.sharded == () and s.total_bytes == 16 * P
    assert "4 B/param parameters, 4 B gradients" in s.assumption and "8 B adam state" in s.assumption


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"zero_stage": 0}, (4, 4, 8)),
        ({"zero_stage": 1}, (4, 4, 2)),
        ({"zero_stage": 2}, (4, 1, 2)),
        ({"zero_stage": 3}, (1, 1, 2)),
        ({"fsdp": True}, (1, 1, 2)),
    ],
)
def test_what_is_sharded_is_divided_by_the_data_parallel_size(kwargs, expected):
    s = state_memory(P, 4, **kwargs)
    assert (s.parameter_bytes, s.gradient_bytes, s.optimizer_bytes) == tuple(b * P for b in expected)


def test_mixed_precision_counts_fp32_master_weights_with_the_optimizer_state():
    s = state_memory(P, 2, precision="bf16", zero_stage=3)
    assert (s.parameter_bytes, s.gradient_bytes, s.optimizer_bytes) == (P, P, 6 * P)  # (2, 2, 4 + 8) / 2
    assert state_memory(P, 1, optimizer="sgd").optimizer_bytes == 4 * P
    assert state_memory(P, 1, optimizer="none").optimizer_bytes == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: state_memory(0), "positive"),
        (lambda: state_memory(P, 2, zero_stage=4), "ZeRO stage must be 0, 1, 2 or 3"),
        (lambda: state_memory(P, 2, zero_stage=1, fsdp=True), "not both"),
        (lambda: parse_count("many"), "cannot read the count"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(MemoryError_, match=message):
        call()


def test_parse_count_units():
    assert [parse_count(t) for t in ("124000000", "1.2e9", "350M", "7B", "3k")] == [
        124_000_000,
        1_200_000_000,
        350_000_000,
        7_000_000_000,
        3000,
    ]


def test_plan_cli_shows_the_sharded_parts_and_adds_them_to_the_micro_batch_estimate():
    args = ["plan", "--global-batch-size", "64", "--world-size", "4", "--parameters", "1e9", "--backend", "fsdp"]
    r = run_cli(*args, "--memory-per-sample", "100MiB", "--memory-budget", "20GiB")
    assert r.returncode == 0, r.stderr
    assert "model state per rank (1,000,000,000 parameters; fp32: 4 B/param parameters" in r.stdout
    assert "optimizer state                  1.86 GiB   / 4 ranks" in r.stdout
    assert "    16      1     5.29 GiB  yes" in r.stdout  # 4e9 B of state + 16 × 100 MiB
    r = run_cli(*args, "--json")
    state = json.loads(r.stdout)["model_state_memory"]
    assert state["total_bytes"] == 4e9 and state["sharded"] == ["parameters", "gradients", "optimizer state"]
    r = run_cli("plan", "--global-batch-size", "64", "--world-size", "4", "--zero-stage", "2")
    assert r.returncode == 2 and "give --parameters N" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(
        "plan",
        "--global-batch-size",
        "64",
        "--world-size",
        "4",
        "--parameters",
        "1e9",
        "--backend",
        "ddp",
        "--zero-stage",
        "1",
    )
    assert r.returncode == 2 and "--zero-stage is a DeepSpeed setting" in r.stderr


def test_parameter_count_of_a_task_counts_trainable_parameters_once():
    from trainers.autobatch import parameter_count
    from trainers.example import TinyGPT

    assert parameter_count("trainers.example:task") == sum(p.numel() for p in TinyGPT().parameters())
