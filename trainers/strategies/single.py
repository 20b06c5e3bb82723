"""SingleDeviceStrategy: one process, no communication (the ReferenceTrainer's backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from launcher.plan import BatchPlan
from trainers.precision import MixedPrecision
from trainers.strategies.base import Strategy

if TYPE_CHECKING:
    from trainers.trainer import CommonOptions


class SingleDeviceStrategy(Strategy):
    """The plain module on one device; precision through MixedPrecision."""

    name = "single"

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def setup(self, model: Any, optimizer: Any, plan: BatchPlan, options: CommonOptions) -> BatchPlan:
        model.to(self.device)
        self.model = self.module = model
        self.optimizer, self.scheduler, self.precision = optimizer, options.scheduler, options.precision
        self.amp = MixedPrecision(
            self.precision,
            self.device,
            model.parameters(),
            optimizer,
            options.scheduler,
            options.clip_grad_norm,
            track_grad_norm=options.track_grad_norm,
        )
        bind_precision(self, self.amp)
        return plan


def bind_precision(strategy: Strategy, amp: MixedPrecision) -> None:
    """Make the precision component's own bound methods the strategy's seams (no extra call
    per micro-step): autocast, backward, scale_gradients, optimizer_step."""
    strategy.autocast = amp.autocast  # type: ignore[method-assign]
    strategy.backward = amp.backward  # type: ignore[method-assign]
    strategy.scale_gradients = amp.scale_gradients  # type: ignore[method-assign]
    strategy.optimizer_step = amp.step  # type: ignore[method-assign]
