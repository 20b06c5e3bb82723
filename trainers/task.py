"""`Task`: everything a trainer needs to build and train one model, as factories.

A task is the unit `gradaccum verify --task MODULE:FUNCTION` loads: `FUNCTION()` returns a
`Task`. Factories rather than objects, because every rank and the single-device
reference must build the *same* model from the same seed, each in its own process.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from launcher.errors import UserError


@dataclasses.dataclass
class Task:
    """Model factory, dataset, loss, optimizer factory, collate; then keyword-only extras.

    `loss(model, batch)` returns a scalar mean over the micro-batch (exact only when all
    micro-batches hold the same number of items/tokens) or a pair `(loss_sum, count)`
    (always exact: the trainers divide by the global count of the optimizer step).
    `count(batch)`, when given, is the count the loss will sum over, computed without the
    model (e.g. the non-pad target tokens); the trainers then scale each micro-step's
    loss up front instead of scaling gradients at the end. Both give the same update.
    """

    model: Callable[[], Any]
    #: map-style (len() and indexing) or a torch.utils.data.IterableDataset (a stream)
    dataset: Sequence[Any] | Any
    loss: Callable[[Any, Any], Any]
    optimizer: Callable[[Iterable[Any]], Any]
    collate: Callable[[list], Any] | None = None
    _: dataclasses.KW_ONLY
    count: Callable[[Any], int] | None = None
    #: `scheduler(optimizer)` -> an LR scheduler, stepped once per optimizer step
    scheduler: Callable[[Any], Any] | None = None
    #: max total gradient norm, applied to the full (all micro-steps, all ranks) gradient
    clip_grad_norm: float | None = None
    #: seeds torch before `model()` and the sampler's shuffling
    seed: int = 0
    name: str = ""
    #: worker processes reading and collating the next step off the training thread (0: none)
    num_workers: int = 0
    #: micro-batches (streams: steps) each worker reads ahead (None: torch's default)
    prefetch_factor: int | None = None
    #: page-locked host batches for asynchronous copies (CUDA only; ignored on CPU)
    pin_memory: bool = True


def load_task(spec: str) -> Task:
    """Import `MODULE:FUNCTION`, call it, and check that it returned a `Task`."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"--task must look like MODULE:FUNCTION (e.g. trainers.example:task), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"cannot import task module {module_name!r} ({e}); is it on PYTHONPATH (or in the current directory)?"
        ) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise UserError(f"module {module_name!r} has no function {func_name!r} (from --task {spec})")
    task = _call_factory(factory, spec)
    if not task.name:
        task.name = spec
    task.loss = CheckedLoss(task.loss, spec)
    return task


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(error: BaseException) -> str:
    """' (at FILE:LINE)' of the innermost frame of `error`'s traceback, or ''."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def _call_factory(factory: Callable[[], Any], spec: str) -> Task:
    """`factory()`, which must return a Task: any other outcome is a UserError naming it.

    Whatever way a task function fails, the user learns which function and what it did, in
    one line: an exception (its type, message and where), a SystemExit (which would
    otherwise end verify silently with its status, 0 included), or a returned non-Task.
    """
    try:
        task = factory()
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        raise UserError(
            f"the task function {spec}() called sys.exit({e.code!r}){_where(e)} instead of returning a trainers.Task"
        ) from None
    except Exception as e:
        raise UserError(
            f"the task function {spec}() raised {type(e).__name__}: {_one_line(e)}{_where(e)}; it must return a trainers.Task"
        ) from None
    if not isinstance(task, Task):
        raise UserError(
            f"the task function {spec}() returned {_short_repr(task)} ({type(task).__name__}); "
            "it must return a trainers.Task"
        )
    return task


def _describe(out: Any) -> str:
    shape = getattr(out, "shape", None)
    return f"{_short_repr(out)} ({type(out).__name__}{f' of shape {tuple(shape)}' if shape is not None else ''})"


class CheckedLoss:
    """A task's loss that says, in one line, which function broke the loss contract and what
    it returned (a string, a vector, a triple, ...). `load_task` wraps the loss of every task
    it loads, so verify and the worker scripts report it as a user error; the trainers' own
    check (trainers.accumulate.split_loss) stays for tasks built in Python."""

    def __init__(self, loss: Callable[[Any, Any], Any], spec: str) -> None:
        self.loss, self.spec = loss, spec
        self.__wrapped__ = loss

    def __call__(self, model: Any, batch: Any) -> Any:
        out = self.loss(model, batch)
        if _is_scalar_tensor(out):
            return out
        if isinstance(out, (tuple, list)) and len(out) == 2 and _is_scalar_tensor(out[0]):
            return out
        name = getattr(self.loss, "__qualname__", type(self.loss).__name__)
        raise UserError(
            f"the loss of task {self.spec} ({name}) returned {_describe(out)}; a loss must return a scalar "
            "tensor (the mean over the micro-batch) or a pair (loss_sum, count) whose loss_sum is a scalar tensor"
        )


def _is_scalar_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dim() == 0
