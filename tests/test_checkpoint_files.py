"""Checkpoint files: atomic saves, verification, fallback, pruning, a kill during a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from launcher import BatchPlan
from tests.conftest import run_cli
from trainers.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

PLAN = BatchPlan.solve(8, 2, world_size=2)


def _state(step):
    return {"model": {"w": torch.full((4,), float(step))}, "step": step}


def test_save_and_load_round_trip(tmp_path):
    path = save_checkpoint(tmp_path, 3, _state(3), plan=PLAN, world_size=2, rank_state={"r": 0})
    assert path.name == "step_00000003" and (tmp_path / "latest").read_text().strip() == "step_00000003"
    state, rank_state, manifest = load_checkpoint(path, rank=0)
    assert torch.equal(state["model"]["w"], torch.full((4,), 3.0)) and rank_state == {"r": 0}
    assert manifest["plan"]["gradient_accumulation_steps"] == 2 and manifest["world_size"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_every_rank_writes_its_file_between_barriers(tmp_path):
    world = 3
    barrier = threading.Barrier(world)
    threads = [
        threading.Thread(
            target=save_checkpoint,
            args=(tmp_path, 5, _state(5) if r == 0 else None),
            kwargs=dict(rank=r, world_size=world, rank_state={"rank": r}, barrier=barrier.wait, plan=PLAN),
        )
        for r in range(world)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    path = latest_checkpoint(tmp_path)
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == [
        "rng_rank00000.pt",
        "rng_rank00001.pt",
        "rng_rank00002.pt",
        "trainer.pt",
    ]
    assert load_checkpoint(path, rank=2)[1] == {"rank": 2}


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_names_the_file_and_auto_falls_back(tmp_path, damage):
    save_checkpoint(tmp_path, 1, _state(1))
    newest = save_checkpoint(tmp_path, 2, _state(2))
    target = newest / "trainer.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(newest)
    assert ("trainer.pt" in str(e.value)) or ("manifest.json" in str(e.value))
    with pytest.warns(UserWarning, match="skipping checkpoint step_00000002"):
        fallback = resolve_checkpoint(tmp_path)
    assert fallback.name == "step_00000001"
    assert load_checkpoint(fallback)[0]["step"] == 1


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


SAVER = """
import sys, torch
from trainers.checkpoint import save_checkpoint
root = sys.argv[1]
big = {"model": {"w": torch.randn(16_000_000)}}  # 64 MB: a save takes a good fraction of a second
for step in range(1, 10_000):
    big["step"] = step
    print("ready", step, flush=True)
    sys.stdin.readline()  # the test says when to start this save, so it knows a save is under way
    save_checkpoint(root, step, big, keep_last=3)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    for attempt, delay in enumerate((0.05, 0.02, 0.1, 0.01, 0.2)):
        root = tmp_path / f"try{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3):  # two complete saves first
            assert proc.stdout.readline().split()[0] == "ready"
            proc.stdin.write("go\n")
            proc.stdin.flush()
        time.sleep(delay)  # the third save has started
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if any(p.name.startswith(".tmp-") for p in root.iterdir()):
            break
    else:
        pytest.fail("never managed to kill the process in the middle of a save")
    path = resolve_checkpoint(root)
    state, _, manifest = load_checkpoint(path)
    assert state["step"] == manifest["step"] == 2
    r = run_cli("checkpoint", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["complete"] is True
    # The next save cleans the half-written directory up.
    save_checkpoint(root, 3, state)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_next_save_removes_temp_files_of_latest_left_by_a_kill(tmp_path):
    # A SIGKILL between mkstemp and the rename in write_text_atomic(root / "latest") leaves
    # `.latest.XXXXXXXX.tmp` (mkstemp's name for it); make one exactly that way.
    import tempfile

    save_checkpoint(tmp_path, 1, _state(1))
    leftovers = [Path(tempfile.mkstemp(prefix=".latest.", suffix=".tmp", dir=tmp_path)[1]) for _ in range(2)]
    other = tmp_path / ".notes.abc.tmp"  # another file's temp name: not ours to remove
    other.write_text("")
    save_checkpoint(tmp_path, 2, _state(2))
    assert not any(p.exists() for p in leftovers)
    assert other.exists() and (tmp_path / "latest").read_text() == "step_00000002\n"


def test_inspect_cli(tmp_path):
    save_checkpoint(tmp_path, 7, _state(7), plan=PLAN, world_size=2)
    r = run_cli("checkpoint", "inspect", str(tmp_path / "step_00000007"))
    assert r.returncode == 0, r.stderr
    assert "step 7, world size 2, plan global 8 = micro 2 × accumulation 2 × dp 2; complete" in r.stdout
    (tmp_path / "step_00000007" / "trainer.pt").write_bytes(b"junk")
    r = run_cli("checkpoint", "inspect", str(tmp_path), "--json")
    assert r.returncode == 1
    assert "truncated" in json.loads(r.stdout)["error"]
    r = run_cli("checkpoint", "inspect", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such checkpoint directory" in r.stderr
