"""FSDPStrategy: PyTorch FSDP2 (`fully_shard`), one gradient reduce-scatter round per step.

Parameters, gradients and optimizer state are sharded over the data-parallel ranks
(trainers/fsdp.py has the building blocks and says how blocks are chosen). The optimizer is
built AFTER sharding from a factory (its parameters are DTensors), and so is a scheduler
given as a factory.

Accumulation: non-boundary micro-steps run forward and backward inside `no_sync`
(gradient reduction off, parameters kept unsharded between the micro-steps of a window),
so one reduce-scatter round per optimizer step. Gradients are reduced by SUM
(`sum_gradients`): the shared loop then scales each loss by 1/(K·dp) or 1/count in one
multiplication (`sums_gradients`), where FSDP2's default average rounds a second time
(measured in tests/test_fsdp.py at world 3).

Precision: fp32, or bf16 through FSDP2's MixedPrecisionPolicy (bf16 parameters for
compute, fp32 gradient reduction, the sharded master weights stay fp32). fp16 is refused.

Checkpoints: model and optimizer through torch.distributed.checkpoint into the
checkpoint's `fsdp/` directory (every rank writes its part inside the atomic temporary
checkpoint directory); DCP reshards on load, so a checkpoint resumes at any world size.
The OOM fallback is refused: FSDP2 offers no public way to reduce gradients accumulated
with sync off after the last backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers import fsdp
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DistInfo, init_distributed
from trainers.precision import MixedPrecision
from trainers.strategies.base import Strategy, process_group_sum, process_group_sum_async
from trainers.strategies.single import bind_precision

if TYPE_CHECKING:
    from trainers.accumulate import StepMetrics
    from trainers.trainer import CommonOptions

#: the directory inside a checkpoint that holds the DCP shards
CHECKPOINT_SUBDIR = "fsdp"


def _is_scheduler_factory(scheduler: Any) -> bool:
    return callable(scheduler) and not hasattr(scheduler, "state_dict")


class FSDPStrategy(Strategy):
    """See the module docstring; the options are FSDPTrainer's."""

    name = "fsdp"
    sums_gradients = True

    def __init__(
        self,
        *,
        blocks: Sequence[str] | str | None = None,
        sync_every_micro_step: bool = False,
        count_collectives: bool = False,
        backend: str | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.sync_every_micro_step = sync_every_micro_step
        self.count_collectives = count_collectives
        self.backend = backend
        self.collective_timeout = collective_timeout
        self.counter: fsdp.GradientReductionCounter | None = None
        self.dist: DistInfo | None = None
        self.all_reduce_sum_async = process_group_sum_async

    def device_for(self, plan: BatchPlan) -> torch.device:
        return init_distributed(plan, self.backend, collective_timeout=self.collective_timeout).device

    def setup(self, model: Any, optimizer: Any, plan: BatchPlan, options: CommonOptions) -> BatchPlan:
        if plan.model_parallel_size != 1:
            raise UserError(
                f"FSDPTrainer is pure data-parallel; the plan has model-parallel size {plan.model_parallel_size}"
            )
        if options.precision == "fp16":
            raise UserError(
                "FSDPTrainer runs fp32 or bf16 (FSDP2's MixedPrecisionPolicy: bf16 compute, fp32 reduction "
                "and master weights); fp16 needs loss scaling it does not do: use --precision bf16"
            )
        if isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(
                "FSDPTrainer needs an optimizer FACTORY, e.g. lambda params: torch.optim.AdamW(params, lr=1e-3): "
                "sharding replaces the parameters by DTensors, so an optimizer built before holds the wrong ones"
            )
        if not callable(optimizer):
            raise UserError(f"FSDPTrainer: optimizer must be a factory optimizer(parameters), got {optimizer!r}")
        info = init_distributed(plan, self.backend, collective_timeout=self.collective_timeout)
        if not isinstance(model, torch.nn.Module):
            model = model()  # a model factory
        model.to(info.device)
        blocks = fsdp.resolve_blocks(model, self.blocks)  # BlockSpecError (a UserError) before sharding
        policy = fsdp.bf16_policy() if options.precision == "bf16" else None
        module = fsdp.shard(model, blocks, mp_policy=policy)
        fsdp.sum_gradients(module)
        optimizer = fsdp.build_optimizer(module, optimizer)
        scheduler = options.scheduler
        if scheduler is not None and _is_scheduler_factory(scheduler):
            scheduler = scheduler(optimizer)
        if self.count_collectives:
            self.counter = fsdp.GradientReductionCounter().install()
        self.model = self.module = module
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dist, self.device, self.dp_rank, self.dp_size = info, info.device, info.rank, info.world_size
        self.precision = options.precision
        # the parameters the optimizer sees are the fp32 shards: no autocast, no accumulator
        self.amp = MixedPrecision(
            "fp32",
            info.device,
            module.parameters(),
            optimizer,
            scheduler,
            options.clip_grad_norm,
            track_grad_norm=options.track_grad_norm,
        )
        bind_precision(self, self.amp)
        self.optimizer_step = self._optimizer_step  # type: ignore[method-assign]
        if self.counter is not None:
            self.backward = self._counted_backward  # type: ignore[method-assign]
        self.n_blocks = len(blocks)
        no_sync = functools.partial(fsdp.no_sync, module)
        self.no_sync = nullcontext if self.sync_every_micro_step else no_sync  # type: ignore[method-assign]
        return plan

    def describe(self, plan: BatchPlan) -> str:
        info = self.dist
        return (
            f"gradaccum: FSDP2 {info.backend} on {info.world_size} process(es) ({info.launcher or 'single'}), "
            f"{self.n_blocks} sharded unit(s), {self.precision}, plan:\n" + plan.describe()
        )

    # ------------------------------------------------------------ step seams
    def _counted_backward(self, loss: torch.Tensor) -> None:
        with self.counter.backward():
            self.amp.backward(loss)

    def _optimizer_step(self) -> torch.Tensor | None:
        norm = self.amp.step()
        if norm is not None and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # clip_grad_norm_ over DTensor gradients returns a DTensor
        return norm

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return process_group_sum(tensor)

    def check_oom_fallback(self) -> str | None:
        return (
            "FSDPTrainer has no OOM fallback: FSDP2 cannot reduce gradients accumulated with sync off after the "
            "last backward; plan the micro-batch with `gradaccum plan --micro-batch-size auto --backend fsdp`"
        )

    # ------------------------------------------------------ round counting
    def begin_step(self) -> None:
        if self.counter is not None:
            self.counter.reset()

    def end_step(self, metrics: StepMetrics) -> None:
        if self.counter is not None:
            metrics.allreduce_rounds = self.counter.rounds

    # ----------------------------------------------------------------- state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every rank gets the whole state_dict, plain CPU tensors, the model's keys."""
        return fsdp.full_state_dict(self.module)

    def replicated_parameters(self) -> list[torch.Tensor]:
        return []  # each rank holds its own shard

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer are sharded and go into the DCP files (write_files)."""
        return {
            "model": None,
            "optimizer": None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": None,
            "backend": self.name,
        }

    def write_files(self, tmp_dir: Path) -> None:
        """Every rank writes its shards into the (temporary, renamed when complete) checkpoint."""
        import torch.distributed.checkpoint as dcp

        dcp.save(fsdp.sharded_state(self.module, self.optimizer), checkpoint_id=str(Path(tmp_dir) / CHECKPOINT_SUBDIR))

    def read_files(self, checkpoint_dir: Path) -> None:
        """Every rank reads the parts of the saved shards it owns now (any world size)."""
        from trainers.checkpoint import CheckpointError

        directory = Path(checkpoint_dir) / CHECKPOINT_SUBDIR
        if not (directory / fsdp.DCP_METADATA).is_file():
            raise CheckpointError(
                f"{checkpoint_dir} holds no FSDP shards ({directory / fsdp.DCP_METADATA} is missing): it was not "
                "written by --backend fsdp; resume it with the backend that wrote it (see its manifest.json 'backend')"
            )
        fsdp.load_sharded(directory, self.module, self.optimizer)

    def close(self) -> None:
        if self.counter is not None:
            self.counter.uninstall()
            self.counter = None
