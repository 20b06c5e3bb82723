"""Predict step time and per-rank memory for every (world size, micro-batch), and choose (pure).

The measuring is in `trainers.advise_trial`; this module only does arithmetic on its numbers,
so it is testable on fixed figures and imports no torch. The model, in brief (docs/advise.md
has it in full, with what it ignores):

- compute: one micro-step (collate, forward, backward) takes `t(m) = a + b·m` seconds at
  micro-batch `m`, fitted per world size from trial processes that ran concurrently (so the
  contention of W processes on the trial machine is in the figures); the optimizer step
  takes a measured constant (divided by the world size when its state is sharded).
- communication, ring collectives over a link of bandwidth `B` and latency `L` among `N`
  ranks: all-reduce `2(N−1)/N · bytes/B + 2(N−1)·L`; reduce-scatter and all-gather half
  of that each.
- when they run: DDP all-reduces the gradients once per optimizer step, during the last
  micro-step's backward, bucket by bucket (the exposed part is what is left when backward
  ends); DeepSpeed ZeRO 0/1 reduce once per step after backward (1: plus an all-gather of
  the updated parameters); ZeRO 2 reduce-scatters gradients on every micro-step; ZeRO 3
  all-gathers parameters for forward and again for backward and reduce-scatters gradients
  on every micro-step; FSDP2 with gradient sync off between boundaries all-gathers for
  forward and backward on every micro-step and reduce-scatters once per step. Sharded
  backends are modelled without overlap (an upper bound).
- memory: `launcher.memory.MemoryModel` (peak ≈ base + per-sample × m) with the sharded
  states' share `(1 − 1/N)` taken off the base.
- choice: the fastest predicted optimizer step among the options that fit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from launcher.errors import UserError
from launcher.memory import FSDP_SHARDING, ZERO_SHARDING, MemoryModel, format_bytes, micro_options
from launcher.plan import _divisors

MiB = 1024**2
#: DDP's bucket sizes (torch defaults: the first bucket is small so communication starts early)
DDP_FIRST_BUCKET_BYTES = 1 * MiB
DDP_BUCKET_BYTES = 25 * MiB
#: latency assumed when --interconnect gives a bandwidth alone (one ring step between nodes)
DEFAULT_LATENCY_US = 5.0
BACKENDS = ("ddp", "deepspeed", "fsdp")


class AdviseError(UserError):
    """Bad advisor input: world sizes, interconnect, a budget nothing fits."""


# ------------------------------------------------------------------ collectives
@dataclasses.dataclass(frozen=True)
class Link:
    """A link for ring collectives: bandwidth in bytes/s (NCCL's 'bus bandwidth'), latency in s."""

    bandwidth_bytes_per_s: float
    latency_s: float
    source: str = "given"

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise AdviseError(f"interconnect bandwidth must be positive, got {self.bandwidth_bytes_per_s} bytes/s")
        if self.latency_s < 0:
            raise AdviseError(f"interconnect latency must not be negative, got {self.latency_s} s")


def parse_interconnect(text: str) -> Link:
    """'GBPS[,LATENCY_US]' (gigabytes per second, microseconds) -> Link."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:,\s*([0-9.eE+-]+)\s*)?", text)
    try:
        gbps = float(m[1]) if m else None
        latency_us = float(m[2]) if m and m[2] else DEFAULT_LATENCY_US
    except ValueError:
        gbps = None
    if gbps is None:
        raise AdviseError(f"cannot read --interconnect {text!r}: give GBPS[,LATENCY_US], e.g. 25 or 25,8")
    if not gbps > 0:
        raise AdviseError(f"--interconnect bandwidth must be positive (GB/s), got {text!r}: e.g. 25 or 25,8")
    if latency_us < 0:
        raise AdviseError(f"--interconnect latency must not be negative (microseconds), got {text!r}")
    return Link(gbps * 1e9, latency_us * 1e-6, f"--interconnect {text}")


def ring_allreduce_s(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce: 2(N−1)/N · bytes / bandwidth + 2(N−1) · latency (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth_bytes_per_s + 2 * (ranks - 1) * link.latency_s


def ring_half_s(nbytes: float, ranks: int, link: Link) -> float:
    """Ring reduce-scatter or all-gather of `nbytes` (the full size): half an all-reduce."""
    return ring_allreduce_s(nbytes, ranks, link) / 2


def fit_link(small_bytes: float, small_s: float, large_bytes: float, large_s: float, ranks: int) -> Link:
    """Bandwidth and latency from all-reduce times at two sizes, solving the ring formula."""
    if ranks <= 1 or large_bytes <= small_bytes:
        raise AdviseError("fitting a link needs two ranks or more and two different sizes")
    factor = 2 * (ranks - 1) / ranks
    per_byte = max((large_s - small_s) / (large_bytes - small_bytes), 1e-15)
    latency = max(small_s - small_bytes * per_byte, 0.0) / (2 * (ranks - 1))
    return Link(factor / per_byte, latency, f"measured between {ranks} local processes")


def ddp_buckets(gradient_bytes: float) -> list[float]:
    """Bucket sizes in the order backward fills them: a small first bucket, then full ones."""
    out, left = [], float(gradient_bytes)
    cap = DDP_FIRST_BUCKET_BYTES
    while left > 0:
        out.append(min(cap, left))
        left -= out[-1]
        cap = DDP_BUCKET_BYTES
    return out


def ddp_exposed_allreduce_s(gradient_bytes: float, ranks: int, link: Link, backward_s: float) -> float:
    """Communication left after the last backward ends, when DDP all-reduces bucket by bucket.

    Gradients are assumed ready at a steady rate over the backward; a bucket starts when it
    is full and the previous one is done (one communication stream)."""
    if ranks <= 1 or gradient_bytes <= 0:
        return 0.0
    done, filled = 0.0, 0.0
    for size in ddp_buckets(gradient_bytes):
        filled += size
        ready = backward_s * filled / gradient_bytes
        done = max(done, ready) + ring_allreduce_s(size, ranks, link)
    return max(done - backward_s, 0.0)


# ------------------------------------------------------------------ compute
@dataclasses.dataclass(frozen=True)
class Line:
    """t(m) = intercept + slope × m."""

    intercept: float
    slope: float

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> Line:
        if len({x for x, _ in points}) < 2:
            raise AdviseError(f"need times at two or more micro-batch sizes to fit, got {list(points)}")
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        slope = max(slope, 0.0)  # a larger micro-batch never takes less time: noise
        return cls(max(my - slope * mx, 0.0), slope)

    def __call__(self, m: float) -> float:
        return self.intercept + self.slope * m


@dataclasses.dataclass(frozen=True)
class Compute:
    """What trial processes measured at one world size."""

    forward: Line  # collate + forward + loss, per micro-step
    backward: Line
    optimizer_step_s: float
    link: Link | None  # None at world size 1
    #: what the real trainer adds per micro-step and per optimizer step (see `calibrate`)
    micro_overhead_s: float = 0.0
    step_overhead_s: float = 0.0

    def micro_step_s(self, m: int) -> float:
        return self.forward(m) + self.backward(m) + self.micro_overhead_s


def calibrate(
    compute: Compute, micro: int, step_s: dict[int, float], gradient_bytes: float, ranks: int, local: Link | None
) -> Compute:
    """Add the trainer's own overheads, from whole DDPTrainer steps timed at `micro` and two K.

    Per micro-step: the slope of step time in K, less the raw micro-step. Per step: the K = 1
    step, less one trainer micro-step, the (modelled) all-reduce on the local link, and the
    optimizer step. Both clamped at 0 (noise must not make the trainer faster than its parts)."""
    (k_lo, t_lo), (k_hi, t_hi) = sorted(step_s.items())[0], sorted(step_s.items())[-1]
    per_micro = (t_hi - t_lo) / (k_hi - k_lo)
    micro_overhead = max(per_micro - compute.micro_step_s(micro), 0.0)
    comm = ddp_exposed_allreduce_s(gradient_bytes, ranks, local, compute.backward(micro)) if local else 0.0
    step_overhead = max(t_lo - k_lo * per_micro - comm - compute.optimizer_step_s, 0.0)
    return dataclasses.replace(compute, micro_overhead_s=micro_overhead, step_overhead_s=step_overhead)


@dataclasses.dataclass(frozen=True)
class StateBytes:
    gradient_bytes: float
    parameter_bytes: float
    optimizer_state_bytes: float


def sharded_fractions(backend: str, zero_stage: int) -> tuple[bool, bool, bool]:
    """(optimizer state, gradients, parameters) sharded across the data-parallel ranks?"""
    if backend == "fsdp":
        return FSDP_SHARDING
    if backend == "deepspeed":
        return ZERO_SHARDING[zero_stage]
    return ZERO_SHARDING[0]


def communication_s(
    backend: str, zero_stage: int, ranks: int, k: int, state: StateBytes, link: Link | None, backward_s: float
) -> tuple[float, str]:
    """Exposed communication per optimizer step, and a few words on what it is."""
    if ranks <= 1:
        return 0.0, "none (one rank)"
    assert link is not None
    g, p = state.gradient_bytes, state.parameter_bytes
    if backend == "ddp":
        return ddp_exposed_allreduce_s(g, ranks, link, backward_s), "1 all-reduce/step, overlapped with last backward"
    if backend == "fsdp":
        return (
            k * 2 * ring_half_s(p, ranks, link) + ring_half_s(g, ranks, link),
            "2 all-gathers/micro-step + 1 reduce-scatter/step",
        )
    if zero_stage == 0:
        return ring_allreduce_s(g, ranks, link), "1 all-reduce/step after backward"
    if zero_stage == 1:
        return ring_half_s(g, ranks, link) + ring_half_s(p, ranks, link), "1 reduce-scatter + 1 all-gather/step"
    if zero_stage == 2:
        return k * ring_half_s(g, ranks, link) + ring_half_s(p, ranks, link), "1 reduce-scatter/micro-step"
    return k * (2 * ring_half_s(p, ranks, link) + ring_half_s(g, ranks, link)), "2 all-gathers + 1 RS/micro-step"


def memory_at(model: MemoryModel, state: StateBytes, backend: str, zero_stage: int, ranks: int) -> MemoryModel:
    """The measured one-process memory line with the sharded states' (1 − 1/N) share taken off."""
    opt, grads, params = sharded_fractions(backend, zero_stage)
    saved = opt * state.optimizer_state_bytes + grads * state.gradient_bytes + params * state.parameter_bytes
    return MemoryModel(model.base_bytes - saved * (1 - 1 / ranks), model.per_sample_bytes, model.points)


# ------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class Option:
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    predicted_step_s: float
    predicted_peak_bytes: float
    fits: bool
    compute_s: float
    communication_s: float
    optimizer_step_s: float
    samples_per_s: float
    tokens_per_s: float | None
    communication: str
    scaling_efficiency: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_world_sizes(global_batch_size: int, world_sizes: Sequence[int]) -> list[int]:
    if global_batch_size is None or global_batch_size <= 0:
        raise AdviseError(f"--global-batch-size must be a positive integer, got {global_batch_size}")
    if not world_sizes or any(w <= 0 for w in world_sizes):
        raise AdviseError(f"--world-sizes must be positive integers, e.g. 1,2,4; got {list(world_sizes)}")
    bad = [w for w in world_sizes if global_batch_size % w]
    if bad:
        good = [d for d in _divisors(global_batch_size) if d <= max(world_sizes) * 2]
        raise AdviseError(
            f"world size(s) {', '.join(map(str, bad))} do not divide the global batch {global_batch_size}; "
            f"use divisors of {global_batch_size} (e.g. {', '.join(map(str, good))}) or change the global batch"
        )
    return sorted(set(world_sizes))


def enumerate_options(
    global_batch_size: int,
    world_sizes: Sequence[int],
    compute: dict[int, Compute],
    memory: MemoryModel,
    state: StateBytes,
    budgets: dict[int, float | None],
    backend: str = "ddp",
    zero_stage: int = 0,
    tokens_per_sample: float | None = None,
) -> list[Option]:
    """Every world size × every micro-batch dividing the per-rank batch, predicted."""
    sharded_opt = sharded_fractions(backend, zero_stage)[0]
    options: list[Option] = []
    for n in check_world_sizes(global_batch_size, world_sizes):
        c = compute[n]
        mem = memory_at(memory, state, backend, zero_stage, n)
        for choice in micro_options(global_batch_size, n, mem, budgets.get(n)):
            m, k = choice.micro_batch_size, choice.gradient_accumulation_steps
            comp = k * c.micro_step_s(m)
            comm, what = communication_s(backend, zero_stage, n, k, state, c.link, c.backward(m))
            opt = c.optimizer_step_s / (n if sharded_opt else 1)
            step = comp + comm + opt + c.step_overhead_s
            sps = global_batch_size / step
            tps = sps * tokens_per_sample if tokens_per_sample else None
            options.append(Option(n, m, k, step, choice.estimated_bytes, choice.fits, comp, comm, opt, sps, tps, what))
    base_n = min(o.world_size for o in options)
    base = max(o.samples_per_s for o in options if o.world_size == base_n) / base_n
    return [dataclasses.replace(o, scaling_efficiency=o.samples_per_s / o.world_size / base) for o in options]


def recommend(options: Sequence[Option], budgets: dict[int, float | None]) -> tuple[Option, str]:
    """The fastest option that fits, and one line saying why."""
    fitting = [o for o in options if o.fits]
    if not fitting:
        smallest = min(options, key=lambda o: o.predicted_peak_bytes)
        budget = budgets.get(smallest.world_size)
        raise AdviseError(
            f"no option fits: even micro-batch {smallest.micro_batch_size} at world size {smallest.world_size} "
            f"needs about {format_bytes(smallest.predicted_peak_bytes)} per rank, over the budget "
            f"{format_bytes(budget or 0)} minus 10% margin; raise --memory-budget, use more ranks with a "
            "sharded backend (--backend fsdp, --zero-stage 3), or shrink the model"
        )
    best = min(fitting, key=lambda o: (o.predicted_step_s, o.world_size, -o.micro_batch_size))
    others = [o for o in fitting if o.world_size != best.world_size]
    runner = min(others, key=lambda o: o.predicted_step_s) if others else None
    why = (
        f"fastest predicted step ({best.predicted_step_s * 1e3:.1f} ms) of the {len(fitting)} options that fit"
        + (
            f"; the best at world size {runner.world_size} is {runner.predicted_step_s / best.predicted_step_s:.2f}× slower"
            if runner
            else ""
        )
        + (
            "; larger micro-batches at this world size do not fit"
            if any(
                not o.fits and o.world_size == best.world_size and o.micro_batch_size > best.micro_batch_size
                for o in options
            )
            else ""
        )
    )
    return best, why
