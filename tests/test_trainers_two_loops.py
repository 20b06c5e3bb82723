"""examples/two_loops.py: the two accumulation loops agree once the reduction is right,
and only the stacked loop's memory grows with K (measured in fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_loops_same_weights_and_memory_growth():
    argv = [sys.executable, "examples/two_loops.py", "--json", "--ks", "4,16"]
    argv += ["--width", "256", "--depth", "2", "--micro-batch-size", "256", "--steps", "2"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_abs_weight_diff_loop2_mean"] < 1e-6  # fixed reduction: same weights
    assert report["max_abs_weight_diff_loop2_sum"] > 1e-2  # summed stacked loss: not the same update
    peak = report["peak_bytes"]
    # 4 times the micro-batches: the stacked loop keeps ~4x the graphs alive at once ...
    assert peak["16"]["loop2"] > 2.5 * peak["4"]["loop2"]
    assert peak["16"]["loop2"] > 4 * peak["16"]["loop1"]
    # ... backward per micro-batch stays flat (one micro-batch's activations + gradients)
    assert peak["16"]["loop1"] < 1.25 * peak["4"]["loop1"] + 2**20
