"""Batch-size ramp: a schedule of global batch sizes over consumed samples (pure).

"Don't decay the learning rate, increase the batch size" (Smith et al. 2018) and
Megatron's `--rampup-batch-size START INCREMENT SAMPLES`. Each stage is a full, valid
BatchPlan (micro × accumulation × data-parallel) at the job's world size: the micro-batch
stays, the accumulation grows. The position in the schedule is the number of samples
consumed, which is what a checkpoint stores, so a ramp resumes mid-way at any world size.
"""

from __future__ import annotations

import bisect
import dataclasses
import re

from launcher.errors import UserError
from launcher.plan import BatchPlan, PlanError, _divisors


class RampError(UserError):
    """A ramp whose stages are not valid plans, or a malformed spec."""


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """Stages `(start_sample, global_batch_size)`, sorted, the first starting at sample 0."""

    stages: tuple[tuple[int, int], ...]
    final: BatchPlan

    def __post_init__(self) -> None:
        if not self.stages or self.stages[0][0] != 0:
            raise RampError("a batch ramp needs a first stage starting at sample 0")
        starts = [s for s, _ in self.stages]
        if starts != sorted(set(starts)):
            raise RampError(f"ramp stages must start at increasing sample counts, got {starts}")
        if self.stages[-1][1] != self.final.global_batch_size:
            raise RampError(
                f"the ramp ends at global batch {self.stages[-1][1]} but the plan's global batch is "
                f"{self.final.global_batch_size}"
            )
        for _, g in self.stages:
            self._plan_for_global(g)  # raises with the reason and valid sizes

    # ---------------------------------------------------------------- builders
    @classmethod
    def linear(cls, start: int, increment: int, ramp_samples: int, final: BatchPlan) -> BatchRamp:
        """Megatron's ramp: start, start+increment, ... up to the final global batch, the
        increments spread evenly over `ramp_samples` samples."""
        g = final.global_batch_size
        if start <= 0 or increment <= 0 or ramp_samples <= 0:
            raise RampError(
                f"ramp numbers must be positive, got start {start}, increment {increment}, samples {ramp_samples}"
            )
        if start >= g or (g - start) % increment:
            raise RampError(
                f"a ramp from {start} by {increment} does not reach the global batch {g}: "
                f"(global - start) must be a positive multiple of the increment"
            )
        n_increments = (g - start) // increment
        per_increment = ramp_samples / n_increments
        stages = [(0, start)] + [(round(i * per_increment), start + i * increment) for i in range(1, n_increments + 1)]
        return cls(tuple(stages), final)

    @classmethod
    def parse(cls, spec: str, final: BatchPlan) -> BatchRamp:
        """`"START:INCREMENT:SAMPLES"` (Megatron) or `"G0,G1@SAMPLES1,G2@SAMPLES2"` (explicit)."""
        spec = spec.strip()
        m = re.fullmatch(r"(\d+):(\d+):(\d+)", spec)
        if m:
            return cls.linear(int(m[1]), int(m[2]), int(m[3]), final)
        stages = []
        for i, part in enumerate(spec.split(",")):
            m = re.fullmatch(r"\s*(\d+)\s*(?:@\s*(\d+))?\s*", part)
            if not m or (i > 0) != (m[2] is not None):
                raise RampError(
                    f"cannot read batch ramp {spec!r}: use START:INCREMENT:SAMPLES (e.g. 32:32:100000) "
                    "or G0,G1@SAMPLES,G2@SAMPLES (e.g. 32,64@20000,128@60000)"
                )
            stages.append((int(m[2] or 0), int(m[1])))
        return cls(tuple(stages), final)

    # ----------------------------------------------------------------- queries
    def _plan_for_global(self, g: int, max_micro_batch_size: int | None = None) -> BatchPlan:
        """The stage's plan: the final micro-batch where it divides, else the largest below it
        (and never above `max_micro_batch_size`, e.g. one that ran out of memory)."""
        dp = self.final.data_parallel_size
        cap = min(self.final.micro_batch_size, max_micro_batch_size or self.final.micro_batch_size)
        try:
            if g % dp:
                raise PlanError(f"global batch {g} is not divisible by data-parallel {dp}")
            micro = max(d for d in _divisors(g // dp) if d <= cap)
            return BatchPlan.solve(
                g,
                micro,
                world_size=self.final.world_size,
                model_parallel_size=self.final.model_parallel_size,
                precision=self.final.precision,
            )
        except PlanError as e:
            raise RampError(f"ramp stage with global batch {g} is not a valid plan: {e}") from None

    def global_batch_at(self, consumed_samples: int) -> int:
        i = bisect.bisect_right([s for s, _ in self.stages], consumed_samples) - 1
        return self.stages[i][1]

    def plan_at(self, consumed_samples: int, max_micro_batch_size: int | None = None) -> BatchPlan:
        """The plan for the optimizer step that starts after `consumed_samples` samples."""
        return self._plan_for_global(self.global_batch_at(consumed_samples), max_micro_batch_size)

    def with_world_size(self, world_size: int) -> BatchRamp:
        return BatchRamp(self.stages, self.final.with_world_size(world_size))

    def batches(self, steps: int, consumed_samples: int = 0) -> list[int]:
        """Global batch sizes of the next `steps` optimizer steps."""
        out = []
        for _ in range(steps):
            g = self.global_batch_at(consumed_samples)
            out.append(g)
            consumed_samples += g
        return out

    def to_dict(self) -> dict:
        return {"stages": [list(s) for s in self.stages], "final": self.final.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> BatchRamp:
        return cls(tuple((int(s), int(g)) for s, g in data["stages"]), BatchPlan.from_dict(data["final"]))
