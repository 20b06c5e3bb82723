"""Comparing two model states, and the usual reasons a distributed run does not match.

Relative difference of a tensor: max|distributed - reference| / max|reference| (per tensor,
then the largest over tensors), so parameters near zero do not inflate it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def compare_states(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Largest absolute / relative differences over all tensors, and the worst tensors."""
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise ValueError(f"state_dict keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    rows, exact_mismatch = [], []
    for name, ref in reference.items():
        got = other[name]
        if not ref.is_floating_point():
            if not torch.equal(ref, got):
                exact_mismatch.append(name)
            continue
        if ref.numel() == 0:
            continue
        ref64, got64 = ref.detach().double().cpu(), got.detach().double().cpu()
        diff = float((got64 - ref64).abs().max())
        scale = float(ref64.abs().max())
        rows.append((name, diff, diff / max(scale, 1e-30)))
    rows.sort(key=lambda r: r[2], reverse=True)
    return {
        "max_abs_diff": max((r[1] for r in rows), default=0.0),
        "max_rel_diff": rows[0][2] if rows else 0.0,
        "worst": [{"name": n, "abs": a, "rel": r} for n, a, r in rows[:3]],
        "non_float_mismatch": exact_mismatch,
    }


def _dropout_modules(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
        p = p if p is not None else getattr(module, "dropout", None)
        if isinstance(p, float) and p > 0:
            found.append(name or type(module).__name__)
    return found


def diagnose(model: nn.Module, report: Mapping[str, Any], final_cmp: dict[str, Any] | None) -> list[str]:
    """The usual reasons a distributed run does not match, as far as they can be detected."""
    notes = []
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        notes.append(
            f"BatchNorm layers ({', '.join(bn[:4])}{', ...' if len(bn) > 4 else ''}) normalise with the statistics "
            "of each micro-batch on each rank, not of the global batch: they cannot match a single-device run. "
            "Use SyncBatchNorm (still per micro-batch) or GroupNorm/LayerNorm to compare."
        )
    buffers = {n for n, _ in model.named_buffers()}
    if final_cmp:
        differing = [w["name"] for w in final_cmp["worst"] if w["name"] in buffers and w["rel"] > report["tolerance"]]
        differing += [n for n in final_cmp["non_float_mismatch"] if n in buffers]
        if differing:
            notes.append(
                f"buffers {', '.join(sorted(set(differing)))} differ: buffers updated in forward depend on how the "
                "batch is cut (and DDP broadcasts rank 0's buffers); they cannot match a single-device run"
            )
    drop = _dropout_modules(model)
    if drop:
        notes.append(
            f"dropout is active in {', '.join(drop[:4])}: its random masks depend on the rank and micro-batch, "
            "so the updates differ; switch dropout off (p=0) to compare"
        )
    if report.get("loss_mode") == "mean":
        unequal = report.get("unequal_micro_batches")
        notes.append(
            "the loss returns a scalar mean per micro-batch"
            + (" and micro-batches of different sizes were seen" if unequal else "")
            + ": averaging means of micro-batches with different numbers of items or tokens (padded sequences of "
            "different lengths count) is not the global mean. Return (loss_sum, count) from the loss."
        )
    rel = report.get("max_rel_diff")
    if "adam" in str(report.get("optimizer", "")).lower() and isinstance(rel, float) and rel < 1e-3:
        notes.append(
            f"{report['optimizer']} divides by the root of the squared-gradient average: gradients that are "
            "(almost) exactly zero turn their round-off into full-size steps, and a split batch sums in another "
            "order. A small mismatch like this one can be round-off: try a larger eps (e.g. 1e-5), parameters "
            "without analytically-zero gradients, or a looser --tolerance"
        )
    if (report.get("initial_max_abs_diff") or 0.0) > 0:
        notes.append(
            "the initial weights already differ: the model factory is not deterministic under torch.manual_seed "
            "(it must build the same weights in every process)"
        )
    if final_cmp and final_cmp["worst"]:
        worst = ", ".join(f"{w['name']} (rel {w['rel']:.2e})" for w in final_cmp["worst"])
        notes.append(f"largest differences: {worst}")
    return notes
