"""Collated batches: to the device, and how many items they hold.

The data component itself (sampler or stream, dataset, collate, worker processes) is
trainers.loader.StepLoader; these helpers are shared by it and by Trainer.step(), which also
takes batches the caller collated.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(batch: Any, device: torch.device | None) -> Any:
    """Tensors of a collated batch to `device` (non-blocking: pinned memory copies asynchronously)."""
    if device is None or device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_items(batch: Any) -> int:
    """Items in a collated batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return batch_items(value)
        except TypeError:
            continue
    raise TypeError(f"cannot tell how many items a batch of type {type(batch).__name__} holds; pass MicroBatch")
