"""FSDPTrainer with real gloo processes: equal to the single-device reference, resumable at
another world size, launched like any trainer, and bad input refused with exit status 2.

Equivalence runs `gradaccum verify --backend fsdp` on the built-in example LM (padded
variable-length sequences, (loss_sum, count) loss, with and without Task.count) at world
2 and 3; global batch 120 over 607 sequences makes step 6 a partial last window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

PARTIAL = ["--global-batch-size=120", "--micro-batch-size=4", "--steps=6"]


def verify_json(tmp_path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    result = run_cli("verify", "--json", "--backend=fsdp", "--output-dir", str(tmp_path), *args, timeout=timeout)
    assert result.returncode in (0, 1), result.stderr[-4000:]
    return result, json.loads(result.stdout)


@pytest.mark.timeout(320)
@pytest.mark.parametrize(
    "world,task",
    [(2, "task"), (3, "task"), (2, "task_without_count"), (3, "task_without_count")],
)
def test_fsdp_equals_the_reference_with_a_partial_last_window(tmp_path, world, task):
    result, report = verify_json(tmp_path, f"--nproc-per-node={world}", f"--task=trainers.example:{task}", *PARTIAL)
    assert report["passed"], result.stderr[-4000:]
    assert report["max_rel_diff"] <= 1e-5
    assert [s["items"] for s in report["steps"]] == [120] * 5 + [7]  # 607 sequences: step 6 is partial
    assert report["allreduce_rounds_per_step"] == 1  # one reduce-scatter round, K = 60/world micro-steps
    assert report["plan"]["gradient_accumulation_steps"] == 120 // (4 * world)
    # verify's files are full, unsharded state dicts under the model's own keys
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    final = torch.load(tmp_path / "distributed.pt", weights_only=True)
    assert set(initial) == set(final) and "tok.weight" in final
    assert all(final[k].shape == initial[k].shape for k in initial)


@pytest.mark.timeout(200)
def test_without_sync_off_every_micro_step_reduces(tmp_path):
    result, report = verify_json(tmp_path, "--gradient-accumulation-steps=4", "--steps=2", "--sync-every-micro-step")
    assert report["passed"], result.stderr[-4000:]
    assert [s["allreduce_rounds"] for s in report["steps"]] == [4, 4]


@pytest.mark.timeout(300)
def test_a_checkpoint_of_world_2_resumes_at_world_3(tmp_path):
    result, report = verify_json(
        tmp_path, "--steps=3", "--interrupt-at-step=2", "--resume-nproc-per-node=3", "--global-batch-size=24"
    )
    assert report["passed"], result.stderr[-4000:]
    assert report["world_sizes"] == [2, 3]
    assert report["max_rel_diff"] <= 1e-5
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    assert (checkpoint / "fsdp" / ".metadata").is_file()  # DCP shards inside the atomic layout
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["backend"] == "FSDPTrainer" and any(f.startswith("fsdp/") for f in manifest["files"])


@pytest.mark.timeout(120)
def test_bf16_through_the_mixed_precision_policy_trains_close_to_fp32(tmp_path):
    result, report = verify_json(tmp_path, "--precision=bf16", "--steps=2")
    assert report["passed"], result.stderr[-4000:]
    assert report["max_rel_diff"] > 0  # bf16 compute differs from the fp32 reference ...
    for s in report["steps"]:  # ... and the fp32 master weights keep the loss close to it
        assert s["distributed_loss"] == pytest.approx(s["reference_loss"], rel=0.02)


def test_a_block_spec_naming_no_module_exits_2_before_writing(tmp_path):
    out = tmp_path / "out"
    result = run_cli("verify", "--backend=fsdp", "--fsdp-blocks=nosuch.*", "--output-dir", str(out))
    assert result.returncode == 2, result.stderr
    assert "'nosuch.*' names no module" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    result = run_cli("verify", "--backend=ddp", "--fsdp-blocks=layers.*", "--output-dir", str(out))
    assert result.returncode == 2 and "--fsdp-blocks is for --backend fsdp" in result.stderr


def launch_train(tmp_path, *train_args: str, nproc: int = 2, timeout: float = 200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRADACCUM_PLAN"}
    return run_cli(
        "launch",
        "--launcher=torchrun",
        f"--nproc-per-node={nproc}",
        "--global-batch-size=24",
        "--micro-batch-size=4",
        "--run-dir",
        str(tmp_path / "run"),
        "--",
        str(REPO / "examples" / "train.py"),
        *train_args,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.timeout(220)
def test_example_script_trains_with_fsdp_under_gradaccum_launch(tmp_path):
    out = tmp_path / "model.pt"
    result = launch_train(tmp_path, "--backend=fsdp", "--steps=3", f"--output={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 3 and all("allreduce_rounds 1" in ln and "items 24" in ln for ln in lines)
    losses = [float(ln.split()[3]) for ln in lines]
    assert losses[-1] < losses[0]
    state = torch.load(out, weights_only=True)  # gathered from the shards: plain tensors, own keys
    from trainers.example import task

    expected = task().model().state_dict()
    assert set(state) == set(expected) and all(state[k].shape == expected[k].shape for k in expected)


def train_one_process(tmp_path, *train_args: str) -> subprocess.CompletedProcess:
    """examples/train.py as one process (world 1): the exit status is the script's own."""
    env = {k: v for k, v in os.environ.items() if k != "GRADACCUM_PLAN"}
    argv = [sys.executable, str(REPO / "examples" / "train.py"), "--global-batch-size=8", "--micro-batch-size=2"]
    return subprocess.run(argv + list(train_args), capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


@pytest.mark.timeout(300)
def test_bad_block_spec_and_a_checkpoint_of_another_backend_exit_2(tmp_path):
    result = train_one_process(tmp_path, "--backend=fsdp", "--fsdp-blocks=nosuch", "--steps=1")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "'nosuch' names no module of TinyGPT" in result.stderr and "Traceback" not in result.stderr
    for written_by, resumed_by, message in (
        ("ddp", "fsdp", "not written by --backend fsdp"),
        ("fsdp", "ddp", "written by --backend fsdp and this run uses ddp"),
    ):
        ckpt = tmp_path / f"{written_by}-ckpt"
        result = train_one_process(tmp_path, f"--backend={written_by}", "--steps=1", f"--checkpoint-dir={ckpt}")
        assert result.returncode == 0, result.stderr[-4000:]
        args = (f"--backend={resumed_by}", "--steps=2", f"--checkpoint-dir={ckpt}", "--resume=auto")
        result = train_one_process(tmp_path, *args)
        assert result.returncode == 2, result.stderr[-4000:]
        assert message in result.stderr and "Traceback" not in result.stderr
        assert [p.name for p in ckpt.iterdir() if p.name.startswith("step_")] == ["step_00000001"]  # nothing new
