"""Facts for the DeepSpeed ZeRO-3 and universal-checkpoint integration, proven on real processes.

tests/scripts/deepspeed_zero3_universal.py is a prototype outside the trainer: (a) ZeRO-3
with a torch optimizer passed in, K-step accumulation with `engine.backward(loss,
scale_wrt_gas=False)`, equals the single-process reference, both with the loss scaled
before backward (Task.count) and with the reduced gradient partitions scaled by dp/N
before `engine.step()`; (b) a ZeRO-2 checkpoint of 2 processes, converted by
`deepspeed.checkpoint.ds_to_universal`, loads at 1 process with params and Adam state equal.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.test_fsdp import reference_states
from trainers.verify import compare_states

SCRIPT = "tests/scripts/deepspeed_zero3_universal.py"
K, STEPS, MICRO = 2, 2, 2

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def run(*argv: str, nproc: int | None = None, timeout: float = 600) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADACCUM_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", SCRIPT]
    full = [*prefix, *argv] if nproc else [sys.executable, *argv]
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.timeout(900)
def test_zero3_accumulation_equals_the_single_process_reference(tmp_path):
    out = tmp_path / "zero3.pt"
    run("zero3", f"--k={K}", f"--steps={STEPS}", f"--output={out}", nproc=2)
    states = torch.load(out)
    reference = reference_states(MICRO * K * 2)
    for mode in ("count", "nocount"):  # loss scaled before backward / reduced partitions scaled before step
        assert compare_states(reference[0], states[mode][0])["max_rel_diff"] == 0.0
        for step in range(1, STEPS + 1):
            diff = compare_states(reference[step], states[mode][step])
            assert diff["max_rel_diff"] <= 1e-5, (mode, step, diff)
            assert compare_states(reference[step - 1], states[mode][step])["max_rel_diff"] > 1e-3  # it trained


@pytest.mark.timeout(900)
def test_zero2_universal_checkpoint_of_2_processes_loads_at_1_with_equal_params_and_adam_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    run("save", f"--k={K}", f"--steps={STEPS}", f"--dir={ckpt}", f"--output={tmp_path / 'saved.pt'}", nproc=2)
    run(
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ckpt / "step2"),
        "--output_folder",
        str(ckpt / "step2_universal"),
    )
    run("load", f"--k={K}", f"--dir={ckpt}", f"--output={tmp_path / 'loaded.pt'}", nproc=1)
    saved, loaded = torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "loaded.pt")
    assert (saved["world"], loaded["world"]) == (2, 1)
    assert saved["global_steps"] == loaded["global_steps"] == STEPS
    assert set(saved["params"]) == set(loaded["params"])
    for name, tensor in saved["params"].items():
        assert torch.equal(loaded["params"][name], tensor), name
    assert set(saved["adam"]) == set(loaded["adam"])
    for name, entries in saved["adam"].items():
        for key, value in entries.items():
            assert torch.equal(loaded["adam"][name][key], value), (name, key)
    assert saved["adam"]["__step__"]["step"].tolist() == [float(STEPS)]
    assert float(saved["adam"]["head.weight"]["exp_avg"].abs().max()) > 0  # a real state, not zeros
