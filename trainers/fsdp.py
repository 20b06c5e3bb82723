"""FSDP2 building blocks: which modules to shard, sharding them, accumulating, counting, saving.

These are the parts an FSDP strategy is assembled from (`torch.distributed.fsdp.fully_shard`,
"FSDP2"): parameters, gradients and optimizer state are sharded across the data-parallel
ranks; each block all-gathers its parameters for forward/backward and reduce-scatters its
gradients after backward.

- Blocks: `default_blocks` picks every direct child of the root that holds parameters,
  descending into containers without `forward` (`ModuleList`, `ModuleDict`: `fully_shard`
  refuses those), then the root; `resolve_blocks` turns a user's spec (qualified-name glob
  patterns or class names) into modules and names any entry that matches nothing.
- `shard` applies `fully_shard` per block, then at the root. Build the optimizer AFTER
  sharding (`build_optimizer`): its parameters must be the sharded DTensors.
- Accumulation: `micro_step_sync(module, boundary)` turns gradient reduction off on
  non-boundary micro-steps (gradients accumulate unsharded, locally) and keeps parameters
  unsharded between the micro-steps of one window, so the next forward does not all-gather
  again; on the boundary both are restored. One reduce-scatter round per optimizer step.
  `no_sync(module)` is the same as a context manager around a non-boundary micro-step.
- `GradientReductionCounter` counts the backward passes that reduced gradients ("rounds").
- `sum_gradients` makes the reduction a plain SUM over the ranks (FSDP2 averages by
  default): the loss is then scaled by 1/(K·dp) or 1/N once (trainers/accumulate.py's
  `sums_gradients`) instead of dp/N and a division by dp that round twice.
- `full_state_dict` / `full_optimizer_state_dict` gather plain tensors with the model's own
  keys (verify's initial/reference/distributed .pt files); `save_sharded` / `load_sharded`
  write and read model + optimizer through `torch.distributed.checkpoint` (DCP), every rank
  its part, and DCP reshards on load, so a checkpoint of world size P loads at any other size.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.errors import UserError

#: containers that have no forward of their own: `fully_shard` refuses them, their children are blocks
CONTAINERS = (nn.ModuleList, nn.ModuleDict)
#: the file in a sharded checkpoint directory that DCP writes last (its presence marks a finished save)
DCP_METADATA = ".metadata"


class BlockSpecError(UserError):
    """An FSDP block spec entry that names no module of the model."""


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def default_blocks(module: nn.Module) -> list[nn.Module]:
    """Every direct child of `module` that holds parameters (a container's children instead of
    the container, recursively), then `module` itself. For `layers: ModuleList` + `out: Linear`:
    each layer, `out`, the root."""

    def children(parent: nn.Module) -> Iterator[nn.Module]:
        for child in parent.children():
            if isinstance(child, CONTAINERS):
                yield from children(child)
            elif _holds_parameters(child):
                yield child

    return [*children(module), module]


def _name_matches(name: str, pattern: str) -> bool:
    """Glob per dotted segment: `blocks.*` is each direct child of `blocks`, not their children."""
    parts, globs = name.split("."), pattern.split(".")
    return len(parts) == len(globs) and all(fnmatch.fnmatchcase(p, g) for p, g in zip(parts, globs, strict=True))


def resolve_blocks(module: nn.Module, spec: Sequence[str] | None) -> list[nn.Module]:
    """The modules named by `spec`, in module order, then the root (None: `default_blocks`).

    An entry is a glob over qualified module names, per dotted segment (`blocks.*`, `head`) or a class name
    (`Block`); an entry that matches no module is an error naming the names there are.
    Containers without forward (ModuleList, ModuleDict) are never blocks: they are refused.
    """
    if spec is None:
        return default_blocks(module)
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if not spec:
        raise BlockSpecError("the FSDP block spec is empty: name modules (e.g. 'blocks.*') or leave it unset")
    named = [(name, m) for name, m in module.named_modules() if name]
    chosen: dict[int, nn.Module] = {}
    for entry in spec:
        hits = [(n, m) for n, m in named if _name_matches(n, entry) or type(m).__name__ == entry]
        if not hits:
            classes = sorted({type(m).__name__ for _, m in named})
            raise BlockSpecError(
                f"FSDP block spec entry {entry!r} names no module of {type(module).__name__}. Module names: "
                f"{', '.join(n for n, _ in named[:20])}{' ...' if len(named) > 20 else ''}; classes: "
                f"{', '.join(classes)}. Give qualified-name globs (e.g. 'blocks.*') or class names."
            )
        for name, m in hits:
            if isinstance(m, CONTAINERS):
                raise BlockSpecError(
                    f"FSDP block spec entry {entry!r} names {name!r}, a {type(m).__name__} (no forward, which "
                    f"fully_shard refuses): name its children instead, e.g. '{name}.*'"
                )
            chosen[id(m)] = m
    order = {id(m): i for i, (_, m) in enumerate(named)}
    return [*sorted(chosen.values(), key=lambda m: order[id(m)]), module]


def bf16_policy() -> Any:
    """bf16 parameters for compute, fp32 gradient reduction; the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(
    module: nn.Module,
    blocks: Sequence[nn.Module] | Sequence[str] | None = None,
    *,
    mp_policy: Any = None,
    mesh: Any = None,
) -> nn.Module:
    """`fully_shard` each block, then the root (in place; returns `module`, now an FSDPModule).

    `blocks`: modules, a spec for `resolve_blocks`, or None for `default_blocks`. Every rank of
    the (default) process group holds one shard; `mesh` gives another 1-D device mesh.
    """
    from torch.distributed.fsdp import fully_shard

    if blocks is None or (blocks and isinstance(blocks[0], str)) or isinstance(blocks, str):
        blocks = resolve_blocks(module, blocks)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in blocks:
        if block is not module:
            fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def sum_gradients(module: nn.Module) -> None:
    """Reduce gradients by plain SUM (no division by the data-parallel size) in every FSDP unit.

    FSDP2 averages by default; for world sizes that are not powers of two the division is
    not exact, and a loss scaled by dp/N, then averaged, rounds twice. With SUM, scale the
    loss by 1/N: the reduced gradient is then the global sum over N, rounded as a
    single-device run rounds it.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def build_optimizer(module: nn.Module, factory: Callable[[Iterable[nn.Parameter]], Any]) -> Any:
    """The optimizer over the sharded parameters (call after `shard`: they are DTensors now)."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    if params and not isinstance(params[0], DTensor):
        raise RuntimeError("build_optimizer before shard(): the optimizer would hold the unsharded parameters")
    return factory(params)


def micro_step_sync(module: nn.Module, boundary: bool) -> None:
    """Set FSDP's accumulation controls for the next forward/backward.

    Non-boundary: no gradient reduce-scatter (unsharded gradients accumulate locally), and
    parameters stay unsharded after backward, so the next micro-step's forward skips the
    all-gather (memory for time: the window's parameters stay gathered). Boundary: reduce,
    and reshard after backward as usual.
    """
    module.set_requires_gradient_sync(boundary)  # type: ignore[operator]
    module.set_reshard_after_backward(boundary)  # type: ignore[operator]


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """The Strategy seam's form of `micro_step_sync`: forward+backward of a non-boundary
    micro-step inside it; on exit gradient sync and resharding are on again for the boundary."""
    micro_step_sync(module, boundary=False)
    try:
        yield
    finally:
        micro_step_sync(module, boundary=True)


#: torch.distributed functions through which FSDP2 reduces gradients (looked up at call time)
REDUCING_FUNCTIONS = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")


class GradientReductionCounter:
    """Counts gradient reductions: `calls` per function, `rounds` = backward passes that issued any.

    Wraps the torch.distributed functions FSDP2 reduces through, counting only inside
    `with counter.backward():`, so the loop's own all-reduce of (loss_sum, count) is not
    gradient communication. For verify and tests; `uninstall()` restores the functions.
    """

    def __init__(self) -> None:
        self.rounds = 0
        self.calls: dict[str, int] = {}
        self._active = self._seen = False
        self._originals: dict[str, Callable[..., Any]] = {}

    def install(self) -> GradientReductionCounter:
        for name in REDUCING_FUNCTIONS:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._active:
                self.calls[name] = self.calls.get(name, 0) + 1
                self._seen = True
            return original(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        self._active, self._seen = True, False
        try:
            yield
        finally:
            self._active = False
            self.rounds += self._seen

    def reset(self) -> None:
        self.rounds, self.calls = 0, {}

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return value


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model's unsharded state_dict (collective: every rank calls it, every rank gets it),
    plain CPU tensors under the model's own keys, as an unsharded `module.state_dict()` has."""
    return {name: _full(value) for name, value in module.state_dict().items()}


def full_optimizer_state_dict(module: nn.Module, optimizer: Any) -> dict[str, dict[str, Any]]:
    """Per parameter name, its optimizer state gathered in full (e.g. Adam's exp_avg, exp_avg_sq,
    step), plain CPU tensors (collective). For comparing optimizer states across world sizes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer)["state"]
    return {name: {k: _full(v) for k, v in entries.items()} for name, entries in state.items()}


def sharded_state(module: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_name(name: str) -> str:
    if _world()[1] == 1:
        return name
    box = [name]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(path: str | os.PathLike[str], module: nn.Module, optimizer: Any) -> Path:
    """Write model + optimizer state through DCP into directory `path` (collective).

    Every rank writes its shards into a temporary sibling directory; after all have
    finished, rank 0 renames it to `path` (an existing `path` is replaced), so `path`
    is either absent or complete.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank, world = _world()
    tmp = path.with_name(_broadcast_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"))
    dcp.save(sharded_state(module, optimizer), checkpoint_id=str(tmp))
    if world > 1:
        dist.barrier()
    if rank == 0:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    if world > 1:
        dist.barrier()
    return path


def load_sharded(path: str | os.PathLike[str], module: nn.Module, optimizer: Any) -> None:
    """Load a `save_sharded` checkpoint into this (sharded or plain) module and its optimizer,
    at any world size: DCP reads the parts of the saved shards this rank now owns (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / DCP_METADATA).is_file():
        raise UserError(
            f"{path} is not a finished FSDP (torch.distributed.checkpoint) checkpoint: {DCP_METADATA} is missing"
        )
    state = sharded_state(module, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
