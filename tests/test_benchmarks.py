"""Smoke test of `python -m benchmarks --quick`: every benchmark runs end to end, for real.

Timings are never asserted (the machine is shared); what is asserted is what the figures
rest on: the JSON has its fields, every contender computed the same weights as ours, ours
all-reduces gradients once per step while the naive loop does K times, loop 2's memory
grows with K, `gradaccum plan` imports no torch, and the exit status agrees with the targets.
Accelerate and Lightning are optional (CI installs `.[all,test]`): without them the peers
must be reported as skipped, with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

NAMES = (
    "overhead",
    "peers",
    "comm",
    "memory",
    "launch",
    "microbatch",
    "loader_io",
    "metrics_log",
    "hf_step",
    "zero3",
)


@pytest.mark.slow
@pytest.mark.deepspeed  # the zero3 benchmark runs DeepSpeed engines
@pytest.mark.timeout(420)
def test_quick_benchmarks_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True and results["command"].startswith("python -m benchmarks --quick")
    assert results["machine"]["cpu_count"] >= 1 and results["date"]
    b = results["benchmarks"]
    assert set(NAMES) <= set(b), sorted(b)
    errors = {name: e["error"] for name, e in b.items() if "error" in e}
    assert not errors, errors

    # the exit status says whether every target was met
    targets = results["targets"]
    assert targets and all({"name", "value", "limit", "op", "passed"} <= set(t) for t in targets)
    assert results["passed"] == all(t["passed"] for t in targets)
    assert proc.returncode == (0 if results["passed"] else 1), proc.stderr[-2000:]

    # overhead: ratios with their spread, and the same work (same weights) as the hand loop
    for workload in ("mlp", "lm"):
        entry = b["overhead"]["workloads"][workload]
        assert {"median", "min", "max", "samples"} <= set(entry["ratio"])
        assert entry["weights"]["max_rel_diff"] <= 1e-5

    # zero3: DeepSpeedTrainer at ZeRO 3 against a bare engine loop, paired, on the same weights
    assert {"median", "min", "max", "samples"} <= set(b["zero3"]["ratio"])
    assert b["zero3"]["weights"]["max_rel_diff"] <= 1e-5

    # peers: measured on the same weights, or skipped with the reason
    peers = b["peers"]
    for peer in ("accelerate", "lightning"):
        if peer in peers["skipped"]:
            assert "not installed" in peers["skipped"][peer]
            assert f"{peer} skipped" in proc.stdout
        else:
            entry = peers["workloads"]["mlp"][peer]
            assert entry["weights"]["max_rel_diff"] <= 1e-5
            assert entry["ratio"]["median"] > 0
    assert b["peers"]["workloads"].get("mlp", {}).get("accelerate", {}).get("peer", {}).get("num_processes", 2) == 2

    # communication: one gradient round per step with no_sync, K without
    per_k = b["comm"]["per_k"]
    for k in ("1", "2"):
        assert per_k[k]["ours"]["gradient_rounds"] == 1
        assert per_k[k]["naive"]["gradient_rounds"] == int(k)
        assert per_k[k]["naive"]["gradient_bytes"] == int(k) * per_k[k]["ours"]["gradient_bytes"] > 0

    # memory: the stacked loop keeps K graphs alive
    peaks = b["memory"]["median_peak_bytes"]
    assert set(peaks) == {"loop1", "loop2", "ours"} and set(peaks["ours"]) == {"1", "2"}
    assert peaks["loop2"]["2"] > peaks["loop2"]["1"]

    # micro-batch sweep: auto's choice is one of the timed sizes
    mb = b["microbatch"]
    assert str(mb["auto"]["micro_batch_size"]) in mb["ms_per_step"]

    # launch: the CLI stays torch-free
    assert b["launch"]["torch_imported"] == {"gradaccum plan": [], "gradaccum launch --dry-run": []}
    assert b["launch"]["cli_seconds"]["gradaccum plan"]["median"] > 0

    assert (tmp_path / "table.md").read_text().count("|") > 20
    assert "Targets" in proc.stdout
    for png in ("training.png", "comm.png", "memory.png", "microbatch.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert sorted(results["plots"]) == sorted(["training.png", "comm.png", "memory.png", "microbatch.png"])


def test_rounds_of_several_launches_are_pooled_in_pairs():
    """The full run splits the training rounds over separate launches: pooling keeps every
    round's pair together, adds the rounds, keeps the worst weight difference and each
    launch's own median ratio."""
    from benchmarks.overhead import pool_launches, summarize

    def launch(ours, hand, diff):
        return {
            "warmup": 2,
            "wall_s": 10.0,
            "lm": {
                "task": "LM",
                "parameters": 5,
                "plan": {},
                "rounds": len(ours),
                "ms_per_step": {"ours": ours, "hand": hand},
                "steps_done": {"ours": len(ours) + 2, "hand": len(hand) + 2},
                "weights_vs_ours": {"hand": {"max_abs_diff": diff, "max_rel_diff": diff}},
            },
        }

    pooled = pool_launches([launch([10.0, 20.0], [10.0, 10.0], 0.0), launch([30.0], [20.0], 1e-7)])
    lm = pooled["lm"]
    assert lm["rounds"] == 3 and pooled["launches"] == 2 and pooled["wall_s"] == 20.0
    assert lm["ms_per_step"] == {"ours": [10.0, 20.0, 30.0], "hand": [10.0, 10.0, 20.0]}
    assert lm["steps_done"] == {"ours": 7, "hand": 7}
    assert lm["weights_vs_ours"]["hand"]["max_rel_diff"] == 1e-7
    assert lm["launch_medians_vs_ours"]["hand"] == [1.5, 1.5]
    result, targets = summarize(pooled)
    assert result["workloads"]["lm"]["ratio"]["median"] == 1.5  # ratios per round: 1.0, 2.0, 1.5
    assert [t.passed for t in targets] == [False, True]
