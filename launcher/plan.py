"""BatchPlan: the one place that splits a global batch.

    global_batch_size = micro_batch_size × gradient_accumulation_steps × data_parallel_size

Everything else (DeepSpeed JSON, launcher command lines, sbatch scripts, the
trainers) is derived from a plan built here, so the numbers cannot disagree.
Pure: this module imports neither torch nor anything heavy, so `gradaccum plan`
stays fast.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from launcher.errors import UserError

#: Environment variable holding the path of the plan JSON that launchers hand
#: to every worker; workers read it back and check it against the live group.
PLAN_ENV_VAR = "GRADACCUM_PLAN"

PRECISIONS = ("fp32", "bf16", "fp16")


class PlanError(UserError):
    """The batch numbers do not fit; the message says why and what would."""


def _positive_int(name: str, value: Any) -> int:
    # bool is an int subclass: `micro_batch_size=True` is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PlanError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise PlanError(f"{name} must be a positive integer, got {value}")
    return int(value)


# Deterministic Miller-Rabin witnesses: correct for every n < 3.3e24, far past 64 bits.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _a_factor(n: int) -> int:
    """A non-trivial factor of the odd composite `n` (Pollard's rho, Brent's cycle finding)."""
    for c in itertools.count(1):
        y, r, q, g, x, ys = 2, 1, 1, 1, 2, 2
        while g == 1:
            x = y
            for _ in range(r):
                y = (y * y + c) % n
            k = 0
            while k < r and g == 1:
                ys = y
                for _ in range(min(128, r - k)):
                    y = (y * y + c) % n
                    q = q * abs(x - y) % n
                g = math.gcd(q, n)
                k += 128
            r *= 2
        if g == n:  # the batched gcd overshot: step back one by one
            g = 1
            while g == 1:
                ys = (ys * ys + c) % n
                g = math.gcd(abs(x - ys), n)
        if g != n:
            return g
    raise AssertionError("unreachable")


def _prime_factors(n: int) -> dict[int, int]:
    """{prime: exponent} of n >= 1. Trial division for small primes, then Pollard's rho,
    so a 64-bit n takes milliseconds where trial division up to sqrt(n) takes minutes."""
    out: dict[int, int] = {}
    for p in (2, 3, 5, 7, 11, 13):
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
    stack = [n] if n > 1 else []
    while stack:
        m = stack.pop()
        if _is_prime(m):
            out[m] = out.get(m, 0) + 1
        else:
            f = _a_factor(m)
            stack += [f, m // f]
    return out


def _divisors(n: int) -> list[int]:
    """Every divisor of n >= 1, ascending, built from its prime factors (no search up to n or
    sqrt(n); a 64-bit number has at most about 10^5 divisors)."""
    divisors = [1]
    for p, e in _prime_factors(n).items():
        divisors = [d * p**i for d in divisors for i in range(e + 1)]
    return sorted(divisors)


def _fmt(values: list[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head = ", ".join(map(str, values[: limit - 2]))
    return f"{head}, ..., {values[-1]}"


def _nearest_multiples(value: int, step: int) -> list[int]:
    """The multiples of `step` just below and just above `value` (positive only)."""
    below = (value // step) * step
    above = below + step if below != value else value + step
    return [m for m in (below, above) if m > 0]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """A validated split of the global batch. Build it with `BatchPlan.solve`."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    model_parallel_size: int = 1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # Direct construction gets the same validation as solve(): a plan that
        # exists is a plan that is valid.
        for field in ("global_batch_size", "micro_batch_size", "gradient_accumulation_steps"):
            _positive_int(field, getattr(self, field))
        _positive_int("world_size", self.world_size)
        _positive_int("model_parallel_size", self.model_parallel_size)
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.world_size % self.model_parallel_size:
            raise PlanError(_mp_message(self.world_size, self.model_parallel_size))
        product = self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size
        if product != self.global_batch_size:
            raise PlanError(
                f"inconsistent batch numbers: micro {self.micro_batch_size} × accumulation "
                f"{self.gradient_accumulation_steps} × data-parallel {self.data_parallel_size} = "
                f"{product}, not the global batch {self.global_batch_size}; give two of the three "
                "and let the third be derived"
            )

    # ----------------------------------------------------------------- derived
    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.model_parallel_size

    @property
    def samples_per_rank_per_step(self) -> int:
        """Samples one data-parallel rank processes in one optimizer step."""
        return self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def allreduces_per_step(self) -> int:
        """Gradient all-reduce rounds per optimizer step: only the boundary micro-step syncs."""
        return 1

    # ------------------------------------------------------------------ solver
    @classmethod
    def solve(
        cls,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        gradient_accumulation_steps: int | None = None,
        *,
        world_size: int,
        model_parallel_size: int = 1,
        max_micro_batch_size: int | None = None,
        precision: str = "fp32",
    ) -> BatchPlan:
        """Derive the missing batch number(s) from the given ones.

        Give any two of global / micro / accumulation (or all three, consistent).
        Global alone: the micro-batch is the largest divisor of global / data-parallel
        not above `max_micro_batch_size` (default: no limit, so accumulation 1).
        Micro alone: accumulation 1.
        """
        world = _positive_int("world_size", world_size)
        mp = _positive_int("model_parallel_size", model_parallel_size)
        if world % mp:
            raise PlanError(_mp_message(world, mp))
        dp = world // mp
        g = None if global_batch_size is None else _positive_int("global_batch_size", global_batch_size)
        m = None if micro_batch_size is None else _positive_int("micro_batch_size", micro_batch_size)
        k = (
            None
            if gradient_accumulation_steps is None
            else _positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
        )
        if max_micro_batch_size is not None:
            max_micro_batch_size = _positive_int("max_micro_batch_size", max_micro_batch_size)

        def make(g: int, m: int, k: int) -> BatchPlan:
            return cls(g, m, k, world, mp, precision)

        if g is not None and m is not None and k is not None:
            if m * k * dp != g:
                raise PlanError(
                    f"global batch {g} ≠ micro {m} × accumulation {k} × data-parallel {dp} = "
                    f"{m * k * dp}; {_triple_hint(g, m, k, dp)}"
                )
            return make(g, m, k)
        if g is not None and m is not None:
            if g % (m * dp):
                raise PlanError(_indivisible(g, "micro", m, dp, "accumulation"))
            return make(g, m, g // (m * dp))
        if g is not None and k is not None:
            if g % (k * dp):
                raise PlanError(_indivisible(g, "accumulation", k, dp, "micro"))
            return make(g, g // (k * dp), k)
        if m is not None and k is not None:
            return make(m * k * dp, m, k)
        if g is not None:
            if g % dp:
                raise PlanError(
                    f"global batch {g} is not divisible by data-parallel {dp}; nearest valid "
                    f"global batch sizes: {' or '.join(map(str, _nearest_multiples(g, dp)))}"
                )
            limit = max_micro_batch_size or g // dp
            micro = max(d for d in _divisors(g // dp) if d <= limit)
            return make(g, micro, g // (dp * micro))
        if m is not None:
            return make(m * dp, m, 1)
        raise PlanError(
            "give at least two of --global-batch-size, --micro-batch-size and "
            "--gradient-accumulation-steps (or the global batch alone); got "
            + ("only the accumulation steps" if k is not None else "none of them")
        )

    def with_world_size(self, world_size: int, model_parallel_size: int | None = None) -> BatchPlan:
        """The same global batch at another world size (elastic resume).

        Keeps the micro-batch when it still divides; otherwise takes the largest
        micro-batch below the current one that does, so memory never grows.
        """
        world = _positive_int("world_size", world_size)
        mp = self.model_parallel_size if model_parallel_size is None else model_parallel_size
        mp = _positive_int("model_parallel_size", mp)
        if world % mp:
            raise PlanError(_mp_message(world, mp))
        dp = world // mp
        g = self.global_batch_size
        if g % dp:
            compatible = self.compatible_world_sizes(g, None, max(64, 2 * world), mp)
            raise PlanError(
                f"cannot keep global batch {g} at world size {world}: data-parallel {dp} does "
                f"not divide {g}; world sizes that keep it: {_fmt(compatible)} "
                "(or pass a new global batch size)"
            )
        per_rank = g // dp
        micro = max(d for d in _divisors(per_rank) if d <= self.micro_batch_size)
        return dataclasses.replace(
            self,
            micro_batch_size=micro,
            gradient_accumulation_steps=per_rank // micro,
            world_size=world,
            model_parallel_size=mp,
        )

    @staticmethod
    def compatible_world_sizes(
        global_batch_size: int,
        micro_batch_size: int | None,
        max_world_size: int,
        model_parallel_size: int = 1,
    ) -> list[int]:
        """World sizes up to `max_world_size` at which the global batch can be kept.

        With a micro-batch, it must be kept too (global divisible by micro × dp);
        without, any micro-batch may be chosen (global divisible by dp).
        """
        g = _positive_int("global_batch_size", global_batch_size)
        m = 1 if micro_batch_size is None else _positive_int("micro_batch_size", micro_batch_size)
        mp = _positive_int("model_parallel_size", model_parallel_size)
        top = _positive_int("max_world_size", max_world_size)
        if g % m:
            return []
        # dp must divide g / m: walk its divisors, not every world size up to `top`.
        return [mp * d for d in _divisors(g // m) if mp * d <= top]

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data_parallel_size"] = self.data_parallel_size
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchPlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names[:4] if n not in data]
        if missing:
            raise PlanError(f"plan is missing {', '.join(missing)}")
        plan = cls(**{n: data[n] for n in names if n in data})
        if "data_parallel_size" in data and data["data_parallel_size"] != plan.data_parallel_size:
            raise PlanError(
                f"plan says data_parallel_size {data['data_parallel_size']} but world "
                f"{plan.world_size} / model-parallel {plan.model_parallel_size} = {plan.data_parallel_size}"
            )
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BatchPlan:
        from launcher.atomic import read_json

        return cls.from_dict(read_json(path, "plan", PlanError))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BatchPlan | None:
        """The plan a launcher handed us through $GRADACCUM_PLAN, or None."""
        path = (os.environ if environ is None else environ).get(PLAN_ENV_VAR)
        return cls.from_file(path) if path else None

    def describe(self) -> str:
        """A small human table (what `gradaccum plan` prints)."""
        k = self.gradient_accumulation_steps
        rows = [
            ("global batch size", self.global_batch_size, ""),
            ("micro batch size (per rank)", self.micro_batch_size, ""),
            ("gradient accumulation steps", k, ""),
            (
                "data-parallel size",
                self.data_parallel_size,
                f"world {self.world_size} / model-parallel {self.model_parallel_size}",
            ),
            ("samples per rank per step", self.samples_per_rank_per_step, f"{k} micro-step{'s' if k > 1 else ''}"),
            (
                "gradient all-reduces per step",
                self.allreduces_per_step,
                f"no sync on {k - 1} of {k} micro-steps" if k > 1 else "every micro-step is a boundary",
            ),
            ("precision", self.precision, ""),
        ]
        width = max(len(r[0]) for r in rows)
        lines = []
        for name, value, note in rows:
            line = f"{name:<{width}}  {value!s:>6}"
            lines.append(f"{line}   ({note})" if note else line)
        return "\n".join(lines)


def _mp_message(world: int, mp: int) -> str:
    return (
        f"world size {world} is not divisible by model-parallel size {mp}; model-parallel "
        f"sizes that divide {world}: {_fmt(_divisors(world))}"
    )


def _indivisible(g: int, given: str, value: int, dp: int, derived: str) -> str:
    """Message for `global` not divisible by `value × dp`, with the nearest fixes."""
    step = value * dp
    options = [f"{n} ({derived} {n // step})" for n in _nearest_multiples(g, step)]
    msg = (
        f"global batch {g} is not divisible by {given} {value} × data-parallel {dp} = {step}; "
        f"nearest valid global batch sizes: {' or '.join(options)}"
    )
    if g % dp == 0:
        msg += f"; {given} sizes that divide {g // dp}: {_fmt(_divisors(g // dp))}"
    else:
        msg += f" (and {g} is not divisible by data-parallel {dp} at all)"
    return msg


def _triple_hint(g: int, m: int, k: int, dp: int) -> str:
    hints = [f"global {m * k * dp} keeps micro {m} and accumulation {k}"]
    if g % (m * dp) == 0:
        hints.append(f"accumulation {g // (m * dp)} keeps global {g} and micro {m}")
    if g % (k * dp) == 0:
        hints.append(f"micro {g // (k * dp)} keeps global {g} and accumulation {k}")
    return "valid alternatives: " + "; ".join(hints)
