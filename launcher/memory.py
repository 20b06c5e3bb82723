"""Memory per micro-batch: fit, estimate, choose (pure; the measuring is in trainers.autobatch).

Activation memory grows about linearly in the micro-batch when each micro-batch runs its
own backward (the graph is freed before the next one), so peak ≈ a + b × micro, whatever
the accumulation. The fastest plan is the largest micro-batch that fits; accumulation keeps
the global batch.
"""

from __future__ import annotations

import dataclasses
import re

from launcher.errors import UserError
from launcher.plan import BatchPlan, _divisors

MiB = 1024**2
GiB = 1024**3


class MemoryError_(UserError):  # noqa: N801 - avoid shadowing the builtin MemoryError
    """A budget that nothing fits under, or unreadable memory figures."""


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '300M', '4096' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise MemoryError_(f"cannot read memory size {text!r}: use e.g. 512MiB, 2GiB or a number of bytes")
    unit = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024**4}[m[2].upper()]
    value = float(m[1]) * unit
    if value <= 0:
        raise MemoryError_(f"memory size must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """peak bytes ≈ base_bytes + per_sample_bytes × micro_batch_size."""

    base_bytes: float
    per_sample_bytes: float
    points: tuple[tuple[int, int], ...] = ()

    @classmethod
    def fit(cls, points: list[tuple[int, int]]) -> MemoryModel:
        """Least-squares line through measured (micro, peak bytes) points."""
        if len(points) < 2 or len({m for m, _ in points}) < 2:
            raise MemoryError_(f"need peaks at two or more micro-batch sizes to fit, got {points}")
        n = len(points)
        mx = sum(m for m, _ in points) / n
        my = sum(b for _, b in points) / n
        sxx = sum((m - mx) ** 2 for m, _ in points)
        slope = sum((m - mx) * (b - my) for m, b in points) / sxx
        # Memory cannot shrink with a larger batch: a negative slope is measurement noise.
        slope = max(slope, 0.0)
        return cls(my - slope * mx, slope, tuple(points))

    def estimate(self, micro_batch_size: int) -> float:
        return self.base_bytes + self.per_sample_bytes * micro_batch_size


@dataclasses.dataclass(frozen=True)
class MicroChoice:
    micro_batch_size: int
    gradient_accumulation_steps: int
    estimated_bytes: float
    fits: bool


def micro_options(
    plan_or_global: BatchPlan | int,
    data_parallel_size: int | None,
    model: MemoryModel,
    budget_bytes: float | None,
    margin: float = 0.10,
) -> list[MicroChoice]:
    """Every micro-batch that divides global / dp, with its accumulation and estimated peak."""
    if isinstance(plan_or_global, BatchPlan):
        g, dp = plan_or_global.global_batch_size, plan_or_global.data_parallel_size
    else:
        g, dp = plan_or_global, data_parallel_size
    if g % dp:
        raise MemoryError_(f"global batch {g} is not divisible by data-parallel {dp}")
    usable = None if budget_bytes is None else budget_bytes * (1 - margin)
    out = []
    for micro in _divisors(g // dp):
        est = model.estimate(micro)
        out.append(MicroChoice(micro, g // (dp * micro), est, usable is None or est <= usable))
    return out


def choose_micro_batch_size(
    global_batch_size: int, data_parallel_size: int, model: MemoryModel, budget_bytes: float, margin: float = 0.10
) -> MicroChoice:
    """The largest micro-batch dividing global / dp whose estimate fits under budget × (1 − margin)."""
    options = micro_options(global_batch_size, data_parallel_size, model, budget_bytes, margin)
    fitting = [o for o in options if o.fits]
    if not fitting:
        smallest = options[0]
        raise MemoryError_(
            f"even micro-batch {smallest.micro_batch_size} needs about {format_bytes(smallest.estimated_bytes)}, "
            f"over the budget {format_bytes(budget_bytes)} minus {margin:.0%} margin; "
            "raise the budget, shrink the model or use model parallelism"
        )
    return fitting[-1]


def options_table(options: list[MicroChoice], budget_bytes: float | None) -> str:
    lines = [f"{'micro':>6} {'accum':>6} {'est. peak':>12}  fits" + ("" if budget_bytes else " (no budget given)")]
    for o in options:
        lines.append(
            f"{o.micro_batch_size:>6} {o.gradient_accumulation_steps:>6} {format_bytes(o.estimated_bytes):>12}  {'yes' if o.fits else 'no'}"
        )
    return "\n".join(lines)
