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


def parse_count(text: str) -> int:
    """'124000000', '1.2e9', '350M', '7B' (billions) -> a positive whole count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMB]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise MemoryError_(f"cannot read the count {text!r}: use e.g. 124000000, 1.2e9, 350M or 7B")
    value = int(float(m[1]) * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[m[2].upper()])
    if value < 1:
        raise MemoryError_(f"the count must be positive, got {text!r}")
    return value


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


# ------------------------------------------------------------ model state (params, grads, optimizer)
#: bytes per parameter of parameters, gradients and optimizer state, by precision. fp32: 4 + 4.
#: bf16/fp16 (mixed precision): 16-bit parameters and gradients (2 + 2), and the fp32 master
#: weights (4) counted with the optimizer state, which they live beside.
PRECISION_BYTES = {"fp32": (4, 4, 0), "bf16": (2, 2, 4), "fp16": (2, 2, 4)}
#: optimizer state bytes per parameter, fp32: Adam/AdamW two moments, SGD momentum one buffer
OPTIMIZER_BYTES = {"adam": 8, "sgd": 4, "none": 0}
#: what each sharded backend divides by the data-parallel size: (optimizer state, gradients, parameters)
ZERO_SHARDING = {0: (False, False, False), 1: (True, False, False), 2: (True, True, False), 3: (True, True, True)}
FSDP_SHARDING = (True, True, True)


@dataclasses.dataclass(frozen=True)
class StateMemory:
    """Per-rank bytes of parameters, gradients and optimizer state, and which are sharded."""

    parameters: int
    parameter_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    sharded: tuple[str, ...]
    data_parallel_size: int
    assumption: str

    @property
    def total_bytes(self) -> float:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}

    def describe(self) -> str:
        shard = f"/ {self.data_parallel_size} ranks" if self.sharded else "(replicated on every rank)"
        rows = [
            ("parameters", self.parameter_bytes, "parameters"),
            ("gradients", self.gradient_bytes, "gradients"),
            ("optimizer state", self.optimizer_bytes, "optimizer state"),
        ]
        lines = [f"model state per rank ({self.parameters:,} parameters; {self.assumption})"]
        for label, n, key in rows:
            lines.append(f"  {label:<27}  {format_bytes(n):>12}   {shard if key in self.sharded else 'replicated'}")
        lines.append(f"  {'total':<27}  {format_bytes(self.total_bytes):>12}")
        return "\n".join(lines)


def state_memory(
    parameters: int,
    data_parallel_size: int = 1,
    *,
    precision: str = "fp32",
    optimizer: str = "adam",
    zero_stage: int | None = None,
    fsdp: bool = False,
) -> StateMemory:
    """Bytes per rank of parameters, gradients and optimizer state for `parameters` parameters.

    Sharded (divided by the data-parallel size): optimizer state at ZeRO 1-3 and FSDP,
    gradients at ZeRO 2-3 and FSDP, parameters at ZeRO 3 and FSDP. Buffers, activations and
    the all-gathered working copy of a sharded block are not included.
    """
    if parameters < 1:
        raise MemoryError_(f"--parameters must be a positive count of model parameters, got {parameters}")
    if precision not in PRECISION_BYTES:
        raise MemoryError_(f"unknown precision {precision!r}: one of {', '.join(PRECISION_BYTES)}")
    if optimizer not in OPTIMIZER_BYTES:
        raise MemoryError_(f"unknown optimizer {optimizer!r}: one of {', '.join(OPTIMIZER_BYTES)}")
    if zero_stage is not None and zero_stage not in ZERO_SHARDING:
        raise MemoryError_(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if fsdp and zero_stage is not None:
        raise MemoryError_("give --backend fsdp or --zero-stage, not both: FSDP shards like ZeRO 3 by itself")
    p_bytes, g_bytes, master_bytes = PRECISION_BYTES[precision]
    o_bytes = OPTIMIZER_BYTES[optimizer] + (master_bytes if optimizer != "none" else 0)
    opt_sh, grad_sh, param_sh = FSDP_SHARDING if fsdp else ZERO_SHARDING[zero_stage or 0]
    dp = data_parallel_size
    sharded = tuple(n for n, s in (("parameters", param_sh), ("gradients", grad_sh), ("optimizer state", opt_sh)) if s)
    assumption = (
        f"{precision}: {p_bytes} B/param parameters, {g_bytes} B gradients, "
        + (f"{master_bytes} B fp32 master weights + " if master_bytes and optimizer != "none" else "")
        + f"{OPTIMIZER_BYTES[optimizer]} B {optimizer} state"
    )
    return StateMemory(
        parameters,
        parameters * p_bytes / (dp if param_sh else 1),
        parameters * g_bytes / (dp if grad_sh else 1),
        parameters * o_bytes / (dp if opt_sh else 1),
        sharded,
        dp,
        assumption,
    )
