"""Learning-rate rules tied to the global batch (pure).

- linear: lr = base_lr × global / base_batch (Goyal et al. 2017, "Accurate, Large Minibatch
  SGD"), meant for SGD with a warm-up of a few epochs' worth of steps;
- sqrt:   lr = base_lr × sqrt(global / base_batch), the usual rule for adaptive
  optimizers (Adam, LAMB: Hoffer et al. 2017, You et al. 2019);
- none:   lr = base_lr whatever the batch.

The same rule applies whenever the global batch changes (elastic resume with a new global
batch, a batch-size ramp), so the learning rate always follows the batch it is used with.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from launcher.errors import UserError

LR_RULES = ("linear", "sqrt", "none")


class LRError(UserError):
    """Bad learning-rate settings."""


@dataclasses.dataclass(frozen=True)
class LRRule:
    """`base_lr` is right for `base_batch_size`; `lr_for(global)` scales it by `rule`."""

    rule: str = "none"
    base_lr: float | None = None
    base_batch_size: int | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.rule not in LR_RULES:
            raise LRError(f"--lr-scaling must be one of {', '.join(LR_RULES)}, got {self.rule!r}")
        if self.base_lr is not None and (
            isinstance(self.base_lr, bool)
            or not isinstance(self.base_lr, numbers.Real)
            or not math.isfinite(self.base_lr)
            or self.base_lr <= 0
        ):
            raise LRError(f"--base-lr must be a positive number, got {self.base_lr!r}")
        if self.rule != "none":
            if self.base_lr is None or self.base_batch_size is None:
                raise LRError(
                    f"--lr-scaling {self.rule} needs --base-lr and --base-batch-size "
                    "(the learning rate that is right at that global batch)"
                )
        if self.base_batch_size is not None and (
            isinstance(self.base_batch_size, bool)
            or not isinstance(self.base_batch_size, numbers.Integral)
            or self.base_batch_size <= 0
        ):
            raise LRError(f"--base-batch-size must be a positive integer, got {self.base_batch_size!r}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, numbers.Integral)
            or self.warmup_steps < 0
        ):
            raise LRError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")

    def factor(self, global_batch_size: int) -> float:
        """Multiplier of base_lr at `global_batch_size`."""
        if self.rule == "none":
            return 1.0
        ratio = global_batch_size / self.base_batch_size  # type: ignore[operator]
        return ratio if self.rule == "linear" else math.sqrt(ratio)

    def lr_for(self, global_batch_size: int) -> float | None:
        """Peak learning rate at `global_batch_size` (None when no base_lr was given)."""
        if self.base_lr is None:
            return None
        return self.base_lr * self.factor(global_batch_size)

    def lr_at(self, step: int, global_batch_size: int) -> float | None:
        """Learning rate for optimizer step `step` (0-based): linear warm-up to the peak."""
        peak = self.lr_for(global_batch_size)
        if peak is None or self.warmup_steps == 0 or step >= self.warmup_steps:
            return peak
        return peak * (step + 1) / self.warmup_steps

    def rescale_message(self, old_global: int, new_global: int) -> str:
        old, new = self.lr_for(old_global), self.lr_for(new_global)
        if old is None or new is None:
            return f"global batch {old_global} -> {new_global}; no base learning rate given, optimizer lr unchanged"
        return (
            f"global batch {old_global} -> {new_global}: learning rate {old:.6g} -> {new:.6g} "
            f"({self.rule} scaling from base lr {self.base_lr:g} at batch {self.base_batch_size})"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
