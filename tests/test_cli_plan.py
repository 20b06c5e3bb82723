"""`gradaccum plan` and `gradaccum config` through a real subprocess."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_plan_json_for_two_nodes_of_four():
    r = run_cli(
        "plan",
        "--global-batch-size",
        "96",
        "--micro-batch-size",
        "4",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gradient_accumulation_steps"] == 3
    assert {k: out[k] for k in ("global_batch_size", "micro_batch_size", "world_size", "data_parallel_size")} == {
        "global_batch_size": 96,
        "micro_batch_size": 4,
        "world_size": 8,
        "data_parallel_size": 8,
    }


def test_plan_table_shows_samples_per_rank_and_allreduces():
    r = run_cli("plan", "--global-batch-size", "64", "--gradient-accumulation-steps", "4", "--world-size", "2")
    assert r.returncode == 0, r.stderr
    assert "micro batch size (per rank)" in r.stdout and " 8" in r.stdout
    assert "samples per rank per step          32" in r.stdout
    assert "no sync on 3 of 4 micro-steps" in r.stdout


def test_plan_error_exits_2_with_nearest_values_and_no_traceback():
    r = run_cli("plan", "--global-batch-size", "30", "--micro-batch-size", "4", "--world-size", "2")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "24 (accumulation 3) or 32 (accumulation 4)" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--global-batch-size", "8"], "the world size is required"),
        (["--global-batch-size", "8", "--nnodes", "2"], "--nproc-per-node is missing"),
        (["--global-batch-size", "8", "--nproc-per-node", "2"], "--nnodes is missing"),
        (["--global-batch-size", "8", "--world-size", "4", "--nnodes", "1", "--nproc-per-node", "2"], "disagrees"),
        (["--global-batch-size", "eight", "--world-size", "2"], "invalid int value"),
        (["--global-batch-size", "0", "--world-size", "2"], "must be a positive integer"),
        (["--global-batch-size", "8", "--world-size", "-2"], "must be a positive integer"),
        (["--gradient-accumulation-steps", "2", "--world-size", "2"], "give at least two"),
    ],
)
def test_plan_bad_input(args, fragment):
    r = run_cli("plan", *args)
    assert r.returncode == 2, r.stdout
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_config_deepspeed_writes_atomically_and_merges_base(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    out = tmp_path / "ds.json"
    r = run_cli(
        "config",
        "deepspeed",
        "--global-batch-size",
        "64",
        "--micro-batch-size",
        "4",
        "--world-size",
        "8",
        "--base",
        str(base),
        "--zero-stage",
        "1",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads(out.read_text())
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        64,
        4,
        2,
    )
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["optimizer"]["type"] == "SGD"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.json", "ds.json"]  # no temp file left


def test_config_conflict_writes_nothing(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"train_batch_size": 128}))
    out = tmp_path / "ds.json"
    r = run_cli(
        "config",
        "deepspeed",
        "--global-batch-size",
        "64",
        "--micro-batch-size",
        "4",
        "--world-size",
        "8",
        "--base",
        str(base),
        "-o",
        str(out),
    )
    assert r.returncode == 2
    assert "train_batch_size=128 but the plan has global_batch_size=64" in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base.json"]


def test_config_bad_base_file(tmp_path):
    base = tmp_path / "base.json"
    base.write_text("{oops")
    r = run_cli("config", "deepspeed", "--global-batch-size", "8", "--world-size", "2", "--base", str(base))
    assert r.returncode == 2 and "base.json is not valid JSON" in r.stderr


def test_config_ddp_to_stdout_is_json():
    r = run_cli("config", "ddp", "--global-batch-size", "16", "--micro-batch-size", "2", "--world-size", "2")
    assert r.returncode == 0
    assert json.loads(r.stdout)["gradient_accumulation_steps"] == 4


def test_help_is_useful():
    r = run_cli("--help")
    assert r.returncode == 0 and "plan" in r.stdout and "config" in r.stdout
    r = run_cli("plan", "--help")
    assert "--global-batch-size" in r.stdout and "--nproc-per-node" in r.stdout


@pytest.mark.parametrize(
    "global_batch, world",
    [("1999999999999999978", "2"), (str(4294967291 * 4294967279), "1"), (str(2**64 - 59), "3")],
)
def test_plan_answers_for_64_bit_global_batches(global_batch, world):
    # A divisor search up to n (or sqrt(n)) ran for minutes here; the timeout is a hang
    # guard, far above the milliseconds the factorisation takes.
    r = run_cli("plan", "--global-batch-size", global_batch, "--world-size", world, "--json", timeout=30)
    if int(global_batch) % int(world):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["micro_batch_size"] * out["data_parallel_size"] * out["gradient_accumulation_steps"] == int(global_batch)


def test_config_base_with_a_duplicate_key_exits_2_naming_key_and_file(tmp_path):
    base = tmp_path / "base.json"
    base.write_text('{"train_batch_size": 24, "train_batch_size": 32}')
    out = tmp_path / "ds.json"
    r = run_cli("config", "deepspeed", "--global-batch-size", "32", "--world-size", "2", "--base", str(base), "-o", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{base} gives the key 'train_batch_size' more than once" in r.stderr
    assert not out.exists()
