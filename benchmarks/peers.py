"""Benchmark 2, peers: the same workload through Hugging Face Accelerate and PyTorch Lightning.

Both run inside the same two processes as ours, interleaved step by step (see overhead.py;
Lightning drives its own loop, and the others take their steps at its step boundaries),
which also sidesteps two traps measured here: `accelerate launch --cpu
--num_processes 2` silently runs ONE process (we check `num_processes == 2`), and Lightning
shuffles through the sampler it injects (we pass `use_distributed_sampler=False` and our own
batch sampler). The weights each peer ends with are compared with ours: otherwise the
timing would compare different work.
Target: ours <= 1.0x each.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from benchmarks.common import Target
from benchmarks.overhead import compare, weights_target

NAME = "peers"
TARGET = 1.0
PEERS = ("accelerate", "lightning")


def available() -> tuple[list[str], dict[str, str]]:
    """(peers importable here, {peer: why not} for the others) without importing them."""
    modules = {"accelerate": "accelerate", "lightning": "lightning.pytorch"}
    ok, missing = [], {}
    for peer, module in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            ok.append(peer)
        else:
            missing[peer] = f"{module} is not installed (pip install -e '.[bench]')"
    return ok, missing


def summarize(raw: dict[str, Any], skipped: dict[str, str]) -> tuple[dict[str, Any], list[Target]]:
    result: dict[str, Any] = {"workloads": {}, "skipped": skipped}
    targets = []
    for workload, w in raw.items():
        if not isinstance(w, dict) or "ms_per_step" not in w:
            continue
        for peer in PEERS:
            if peer not in w["ms_per_step"]:
                continue
            entry = {"task": w["task"], "plan": w["plan"], **compare(w, peer), "peer": w["contenders"][peer]}
            result["workloads"].setdefault(workload, {})[peer] = entry
            targets.append(
                Target(
                    f"{workload}: ours / {peer}",
                    entry["ratio"]["median"],
                    TARGET,
                    "<=",
                    "time per optimizer step, median of the per-round ratios",
                )
            )
            targets.append(weights_target(workload, peer, entry["weights"]))
    return result, targets
