"""`gradaccum verify`: the demo passes, the scalar-mean loss visibly fails, bad input exits 2."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from tests.conftest import processes_naming, run_cli
from trainers.verify import compare_states, diagnose


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_default_verify_is_the_passing_demo(tmp_path):
    result = run_cli("verify", "--json", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert report["passed"] is True
    assert report["world_sizes"] == [2]
    assert report["plan"]["gradient_accumulation_steps"] > 1
    assert report["allreduce_rounds_per_step"] == 1
    assert report["max_rel_diff"] <= 1e-5 and isinstance(report["max_abs_diff"], float)
    assert report["loss_mode"] == "sum"
    steps = report["steps"]
    assert len(steps) >= 2
    for s in steps:
        assert s["distributed_loss"] == pytest.approx(s["reference_loss"], rel=1e-5)
    assert steps[-1]["reference_loss"] < steps[0]["reference_loss"]  # it trains
    # padded variable-length sequences: the token count differs from step to step
    assert len({s["count"] for s in steps}) > 1
    for name in ("initial.pt", "reference.pt", "distributed.pt", "report.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    final = torch.load(tmp_path / "distributed.pt", weights_only=True)
    assert set(initial) == set(final) and not any(k.startswith("module.") for k in final)
    # initial.pt is the task's seeded model, before any step
    from trainers.example import task

    t = task()
    torch.manual_seed(t.seed)
    fresh = t.model().state_dict()
    assert all(torch.equal(fresh[k], initial[k]) for k in fresh)
    assert compare_states(initial, final)["max_abs_diff"] > 0  # and the run moved it


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pair_loss_without_task_count_matches_too(tmp_path):
    result = run_cli(
        "verify", "--json", "--task=trainers.example:task_without_count", "--steps=3", "--output-dir", str(tmp_path)
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["passed"], result.stderr
    assert report["max_rel_diff"] <= 1e-5
    assert report["plan"]["gradient_accumulation_steps"] == 3


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scalar_mean_loss_shows_a_visible_difference_and_says_why(tmp_path):
    """The reason the (loss_sum, count) contract exists: a per-micro-batch token mean is wrong."""
    result = run_cli("verify", "--task=trainers.example:task_scalar_mean", "--steps=3", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert "(loss_sum, count)" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and report["loss_mode"] == "mean"
    assert report["max_rel_diff"] > 1e-3  # orders of magnitude above the 1e-5 tolerance
    assert report["allreduce_rounds_per_step"] == 1  # the sync was right; the normalisation was not
    assert any("padded sequences" in d for d in report["diagnostics"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dropout_is_diagnosed(tmp_path):
    result = run_cli(
        "verify", "--json", "--task=trainers.example:task_with_dropout", "--steps=2", "--output-dir", str(tmp_path)
    )
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["passed"] is False
    assert any("dropout is active" in d for d in report["diagnostics"])


def test_batchnorm_and_batch_dependent_buffers_are_diagnosed():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v.clone() for k, v in ref.items()}
    other["1.running_mean"] += 0.5
    other["1.num_batches_tracked"] += 3
    cmp = compare_states(ref, other)
    assert cmp["worst"][0]["name"] == "1.running_mean" and cmp["non_float_mismatch"] == ["1.num_batches_tracked"]
    notes = diagnose(model, {"tolerance": 1e-5, "loss_mode": "sum", "initial_max_abs_diff": 0.0}, cmp)
    text = "\n".join(notes)
    assert "BatchNorm" in text and "SyncBatchNorm" in text and "GroupNorm" in text
    assert "1.running_mean" in text and "1.num_batches_tracked" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "no_such_module_xyz:task"], "cannot import task module"),
        (["--task", "trainers.example"], "MODULE:FUNCTION"),
        (["--task", "trainers.example:no_such_function"], "has no function"),
        (["--backend", "deepspeed", "--deepspeed-config", "no-such-ds.json"], "cannot read DeepSpeed config"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "not divisible"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("verify", "--output-dir", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "report.json").exists()


# --------------------------------------- task functions that do not keep the contract
def task_that_exits():
    raise SystemExit(0)


def task_that_raises():
    raise ValueError("no data in /nowhere")


def task_that_returns_none():
    return None


def task_whose_loss_returns_a_string():
    from trainers.example import mlp_sum_task

    task = mlp_sum_task()

    def string_loss(model, batch):
        return "oops"

    task.loss = string_loss
    return task


def task_counting_nothing():
    """A (loss_sum, count) loss whose count is always 0: no step can be averaged."""
    from trainers.example import mlp_sum_task

    task = mlp_sum_task()
    inner = task.loss

    def loss(model, batch):
        loss_sum, _ = inner(model, batch)
        return loss_sum, 0

    task.loss = loss
    return task


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("task_that_exits", "the task function tests.test_verify:task_that_exits() called sys.exit(0) (at "),
        ("task_that_raises", "tests.test_verify:task_that_raises() raised ValueError: no data in /nowhere (at "),
        ("task_that_returns_none", "tests.test_verify:task_that_returns_none() returned None (NoneType)"),
        (
            "task_whose_loss_returns_a_string",
            "the loss of task tests.test_verify:task_whose_loss_returns_a_string "
            "(task_whose_loss_returns_a_string.<locals>.string_loss) returned 'oops' (str)",
        ),
        ("task_counting_nothing", "step 1: the optimizer step's global count is 0 (the loss's counts summed"),
    ],
)
def test_a_task_that_breaks_the_contract_exits_2_naming_the_function_and_what_it_did(tmp_path, function, message):
    out = tmp_path / "out"
    result = run_cli("verify", "--task", f"tests.test_verify:{function}", "--steps", "1", "--output-dir", str(out))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "report.json").exists()


def task_failing_on_rank_1():
    """The MLP task; the worker of rank 1 fails in its first loss call (the reference does not)."""
    import os

    from trainers.example import mlp_sum_task

    task = mlp_sum_task()
    inner = task.loss

    def loss(model, batch):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1 fails on purpose")
        return inner(model, batch)

    task.loss = loss
    return task


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_reused_output_dir_holds_only_the_last_runs_files(tmp_path):
    args = ("verify", "--json", "--steps=2", "--output-dir", str(tmp_path))
    first = run_cli(*args, "--task=trainers.example:mlp_sum_task")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "loss-curve.png").exists() and (tmp_path / "distributed.pt").exists()
    (tmp_path / "notes.txt").write_text("mine")  # not verify's: stays

    failed = run_cli(*args, "--task=tests.test_verify:task_failing_on_rank_1")
    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)
    assert report["passed"] is False and report["worker_exit_status"] != 0 and report["steps"] == []
    # no earlier loss curve, no distributed.pt holding the initial weights: the failed run took no step
    assert not (tmp_path / "loss-curve.png").exists()
    assert not (tmp_path / "distributed.pt").exists()
    assert set(report["files"]) == {"initial", "reference", "report", "plan", "metrics"}
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 and rows[0].startswith("step,")  # this run's header, no earlier run's rows
    assert all((tmp_path / name).is_file() for name in ("initial.pt", "reference.pt", "report.json", "plan.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert processes_naming(str(tmp_path)) == []


def test_worker_flags_are_built_and_parsed_from_one_definition(monkeypatch):
    """The parent's argv for the worker parses back to the same WorkerArgs (trainers/verify/protocol.py)."""
    from trainers.verify.protocol import WorkerArgs, worker_parser

    monkeypatch.delenv("GRADACCUM_DEEPSPEED_CONFIG", raising=False)
    parser = worker_parser()
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(WorkerArgs)} <= dests
    for args in (
        WorkerArgs(task="m:f", steps=3, output_dir="out"),
        WorkerArgs(
            task="m:f",
            steps=5,
            output_dir="out",
            no_shuffle=True,
            collective_timeout=7.5,
            backend="deepspeed",
            zero_stage=2,
            deepspeed_config="/x/ds.json",
            checkpoint_dir="ck",
            checkpoint_every=1,
            keep_last=2,
            resume="auto",
            hold_after_step=2,
        ),
        WorkerArgs(task="m:f", steps=2, output_dir="out", sync_every_micro_step=True),
    ):
        assert WorkerArgs.from_namespace(parser.parse_args(args.to_argv())) == args


def test_report_renders_the_json_keys_of_the_contract():
    from trainers.verify import Interruption, StepReport, VerifyReport

    step = StepReport(1, 2.0, 2.0, 0.0, 1e-7, 1, "w", 12, 30.0, 0.1, False, 2)
    report = VerifyReport(
        task="t", backend="ddp", zero_stage=None, precision="fp32", plan={}, world_sizes=[2, 3], tolerance=1e-5,
        loss_mode="sum", optimizer="SGD", worker_exit_status=0, output_dir="d", seconds={}, initial_max_abs_diff=0.0,
        steps=[step, dataclasses.replace(step, step=2, max_rel_diff=2e-7, allreduce_rounds=2)],
        unequal_micro_batches=False, passed=True, interrupted=Interruption(1, -9, True, {"world_size": 3}),
    )  # fmt: skip
    d = report.to_dict()
    assert set(d) == {
        "task", "backend", "precision", "plan", "world_sizes", "tolerance", "loss_mode", "optimizer",
        "worker_exit_status", "output_dir", "seconds", "initial_max_abs_diff", "steps", "unequal_micro_batches",
        "max_abs_diff", "max_rel_diff", "allreduce_rounds_per_step", "loss_max_rel_diff", "skipped_steps", "passed",
        "diagnostics", "files", "interrupted_at_step", "interrupt_exit_status", "resumed", "resumed_plan",
    }  # fmt: skip
    assert d["max_rel_diff"] == 2e-7 and d["allreduce_rounds_per_step"] == 2 and d["interrupted_at_step"] == 1
    assert set(d["steps"][0]) == {
        "step", "reference_loss", "distributed_loss", "max_abs_diff", "max_rel_diff", "allreduce_rounds",
        "worst_tensor", "items", "count", "lr", "skipped", "world_size",
    }  # fmt: skip
    json.dumps(d)
