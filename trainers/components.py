"""Trainer components: observers of the loop, and the hang watchdog's seat in it.

A component is an object with any of the hooks below; the trainer calls them in the order
the components were given (`components=[...]`). Observers such as a metrics file, a
TensorBoard writer or a progress bar plug in here without touching the loop. A component
with state that must survive a resume exposes `state_dict()`/`load_state_dict()`.

    on_train_start(trainer, steps)            before the first step of train()/iter_steps()
    on_step_end(trainer, metrics, step_time_s) after each optimizer step, before checkpoints
    on_train_end(trainer)                     when the loop ends (also early, or on error)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.accumulate import StepMetrics
    from trainers.distributed import Watchdog
    from trainers.trainer import Trainer


class Component:
    """No-op hooks to subclass; any object with some of these methods works too."""

    def on_train_start(self, trainer: Trainer, steps: int) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics, step_time_s: float) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


class StepLog(Component):
    """Rank 0 logs one line every `every` steps (the trainers' `log_every`)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics, step_time_s: float) -> None:
        if metrics.step % self.every == 0:
            norm = f"grad-norm {metrics.grad_norm:.4g}  " if metrics.grad_norm is not None else ""
            trainer.log(
                f"step {metrics.step:>5}  loss {metrics.loss:.6f}  items {metrics.items}  {norm}lr {metrics.lr:.3g}"
            )


class HangWatch:
    """Where this rank is, for the hang watchdog (trainers.distributed.Watchdog; None: off).

    `progress(micro_step, phase)` is the accumulation step's progress seam: a bound method
    built once, reading the step number set by `begin_step`.
    """

    def __init__(self, watchdog: Watchdog | None) -> None:
        self.watchdog = watchdog
        self._step = 0
        self._micro_steps: int | None = None

    def begin_step(self, step: int, micro_steps: int) -> None:
        self._step, self._micro_steps = step, micro_steps
        self.watchdog.start()

    def progress(self, micro_step: int | None, phase: str) -> None:
        self.watchdog.progress(self._step, micro_step, phase, self._micro_steps)

    def at(self, step: int, phase: str) -> None:
        """Between steps: `phase` ("data", "checkpoint", ...) of step `step`."""
        if self.watchdog is not None:
            self.watchdog.progress(step, None, phase)

    def start(self, step: int, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.start().progress(step, None, phase)

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()


def observers(components: list[Any], hook: str) -> list[Any]:
    """The bound `hook` methods of the components that define it (looked up once)."""
    return [getattr(c, hook) for c in components if callable(getattr(c, hook, None))]
