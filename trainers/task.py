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
    task = factory()
    if not isinstance(task, Task):
        raise UserError(f"{spec}() must return a trainers.Task, got {type(task).__name__}")
    if not task.name:
        task.name = spec
    return task
