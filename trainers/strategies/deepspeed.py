"""DeepSpeedStrategy: the same step and loss contract as DDP, driven through a DeepSpeed engine.

The DeepSpeed config comes from the BatchPlan (`launcher.configs.deepspeed_config`), so
the engine's triad cannot disagree with the launcher's. Every micro-step goes through
`engine.backward` and `engine.step`, in the shared loop of accumulate.py: DeepSpeed's own
micro-step counter decides when to reduce gradients and when to update.

Loss scaling: `engine.backward` divides the loss by gradient_accumulation_steps unless told
not to. The shared loop has already normalised the loss (1/K for scalar means, dp/N for
(loss_sum, count) pairs), so backward runs with `scale_wrt_gas=False`: dividing twice is
the classic double-scaling bug. For pairs without `Task.count`, the reduced gradients are
multiplied by dp/N after the boundary backward and before `engine.step()`, where DeepSpeed
keeps them (`param.grad` at ZeRO 0, this rank's fp32 partition at ZeRO 1/2, the fp32
partition buffer behind `optimizer.averaged_gradients` at ZeRO 3), so clipping and the
update see the exact global token mean.

Gradient communication: ZeRO 0 and 1 reduce once per optimizer step (on the boundary
micro-step); ZeRO 2 and 3 reduce (and partition) gradients on every micro-step by design.
`count_collectives=True` wraps DeepSpeed's communication backend to count it (verify only).

ZeRO 3 also partitions the parameters: the module's own parameters are empty between
forward passes, so full values come from `fp32_state_dict` (a collective gather).

Checkpoints: DeepSpeed's own files under CHECKPOINT_SUBDIR, with LAYOUT_FILE saying the
stage, data-parallel size and precision they were written with. ZeRO 1-3 keep optimizer
state in one file per data-parallel rank; resuming at another data-parallel size converts
the files once into DeepSpeed's universal checkpoint (trainers/strategies/deepspeed_universal.py)
and loads that.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.accumulate import StepMetrics, grad_norm
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DistInfo, init_distributed
from trainers.strategies.base import Strategy

if TYPE_CHECKING:
    from trainers.trainer import CommonOptions

INSTALL_HINT = "pip install 'gradaccum[deepspeed]' (or: pip install deepspeed)"
#: the sub-directory of a gradaccum checkpoint that holds DeepSpeed's own files, and their tag
CHECKPOINT_SUBDIR, CHECKPOINT_TAG = "deepspeed", "engine"
#: the client_state key DeepSpeed's ds_to_universal requires in a checkpoint it converts
UNIVERSAL_INFO_KEY = "universal_checkpoint_info"
#: in CHECKPOINT_SUBDIR: the ZeRO stage, data-parallel size and precision the files were written with
LAYOUT_FILE = "gradaccum-layout.json"
#: the ZeRO stages DeepSpeedTrainer runs (launcher/trainer_backends.py lists the same)
ZERO_STAGES = (0, 1, 2, 3)
#: reducing collectives of DeepSpeed's communication backend: what gradients travel through
GRADIENT_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "inference_all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
)


def resume_problem(saved: Mapping[str, Any], zero_stage: int, data_parallel_size: int, precision: str) -> str | None:
    """Why a DeepSpeed checkpoint with layout `saved` cannot be loaded by this engine (None: it can).

    Another data-parallel size is not a problem: ZeRO 0 keeps one full copy, and ZeRO 1-3
    state is converted to a universal checkpoint (`needs_universal`).
    """
    stage = int(saved["zero_stage"])
    if stage != zero_stage:
        return f"it was written at ZeRO stage {stage} and this run uses stage {zero_stage}; resume with --zero-stage {stage}"
    if saved.get("precision", precision) != precision:
        return f"it was written in {saved['precision']} and this run uses {precision}; resume with the same precision"
    return None


def needs_universal(saved: Mapping[str, Any], data_parallel_size: int) -> bool:
    """Whether a checkpoint with layout `saved` holds ZeRO 1-3 state partitioned over another
    data-parallel size, which DeepSpeed loads only as a universal checkpoint."""
    return int(saved["zero_stage"]) >= 1 and int(saved["data_parallel_size"]) != data_parallel_size


class DeepSpeedNotInstalled(UserError):
    """deepspeed cannot be imported."""


class EngineMismatch(UserError):
    """The DeepSpeed engine's batch numbers or world size differ from the plan."""


def import_deepspeed() -> Any:
    """`import deepspeed`, or a UserError that says how to install it."""
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedNotInstalled(
            f"DeepSpeedTrainer needs the deepspeed package, which cannot be imported ({e}). Install it with: "
            f"{INSTALL_HINT}; or use DDPTrainer (--backend ddp), which needs only torch."
        ) from None
    return deepspeed


def engine_mismatches(plan: BatchPlan, engine_numbers: Mapping[str, int]) -> list[str]:
    """What differs between the plan and the live engine/process group (empty when all agree).

    `engine_numbers` has train_batch_size, train_micro_batch_size_per_gpu,
    gradient_accumulation_steps (the engine's), world_size (the process group's) and
    data_parallel_size (the engine's dp_world_size).
    """
    expected = {
        "train_batch_size": ("global_batch_size", plan.global_batch_size),
        "train_micro_batch_size_per_gpu": ("micro_batch_size", plan.micro_batch_size),
        "gradient_accumulation_steps": ("gradient_accumulation_steps", plan.gradient_accumulation_steps),
        "world_size": ("world_size", plan.world_size),
        "data_parallel_size": ("data_parallel_size", plan.data_parallel_size),
    }
    return [
        f"the engine's {key} is {engine_numbers[key]} but the plan's {attr} is {value}"
        for key, (attr, value) in expected.items()
        if key in engine_numbers and engine_numbers[key] != value
    ]


class CollectiveCounter:
    """Counts DeepSpeed's reducing collectives, and the backward passes that issued any.

    Wraps the methods of `deepspeed.comm`'s backend object (every DeepSpeed collective goes
    through it). Only calls made while `active` count: the trainer sets it around
    `engine.backward`, so the optimizer's own small reductions (gradient norm, overflow
    check) and the trainer's count all-reduce (plain torch.distributed) stay out.
    """

    def __init__(self) -> None:
        self.active = False
        self.calls: collections.Counter[str] = collections.Counter()
        self.rounds = 0
        self._seen_in_backward = False
        self._backend: Any = None
        self._installed: list[str] = []

    def install(self) -> CollectiveCounter:
        from deepspeed.comm import comm as ds_comm

        backend = ds_comm.cdb
        if backend is None:
            raise RuntimeError("deepspeed.comm has no backend yet: install the counter after deepspeed.initialize")
        self._backend = backend
        for name in GRADIENT_COLLECTIVES:
            original = getattr(backend, name, None)
            if callable(original):
                setattr(backend, name, self._wrap(name, original))
                self._installed.append(name)
        return self

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.calls[name] += 1
                self._seen_in_backward = True
            return original(*args, **kwargs)

        return counted

    def begin_backward(self) -> None:
        self.active, self._seen_in_backward = True, False

    def end_backward(self) -> None:
        self.active = False
        self.rounds += self._seen_in_backward

    def reset(self) -> None:
        self.rounds, self.calls = 0, collections.Counter()

    def uninstall(self) -> None:
        for name in self._installed:
            delattr(self._backend, name)  # the instance attribute shadowed the class's method
        self._installed = []


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer)


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine (ZeRO 0, 1, 2 or 3); the options are DeepSpeedTrainer's."""

    name = "deepspeed"
    supports_plan_change = False  # the engine fixes the accumulation steps

    def __init__(
        self,
        *,
        zero_stage: int | None = None,
        ds_config: Mapping[str, Any] | str | Path | None = None,
        backend: str | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        count_collectives: bool = False,
    ) -> None:
        super().__init__()
        if zero_stage is not None and zero_stage not in ZERO_STAGES:
            raise UserError(f"DeepSpeedTrainer supports ZeRO stages 0, 1, 2 and 3, got {zero_stage!r}")
        self.requested_zero_stage, self.ds_config = zero_stage, ds_config
        self.backend, self.collective_timeout, self.count_collectives = backend, collective_timeout, count_collectives
        self.engine: Any = None
        self.config: dict[str, Any] = {}
        self.zero_stage = 0
        self.dist: DistInfo | None = None
        self.plan: BatchPlan | None = None
        self.collectives: CollectiveCounter | None = None
        self.last_collective_calls: dict[str, int] = {}
        self.track_grad_norm = False
        self._params: list[torch.nn.Parameter] = []
        self._norm_from_params = False

    def device_for(self, plan: BatchPlan) -> torch.device:
        return init_distributed(plan, self.backend, collective_timeout=self.collective_timeout).device

    def setup(self, model: Any, optimizer: Any, plan: BatchPlan, options: CommonOptions) -> BatchPlan:
        from launcher.configs import deepspeed_config, load_json_file

        if plan.model_parallel_size != 1:
            raise UserError(
                f"DeepSpeedTrainer is pure data-parallel; the plan has model-parallel size {plan.model_parallel_size}"
            )
        ds_config = self.ds_config
        base = load_json_file(ds_config, "DeepSpeed config") if isinstance(ds_config, (str, Path)) else ds_config
        config = deepspeed_config(
            plan,
            base,
            zero_stage=self.requested_zero_stage,
            gradient_clipping=options.clip_grad_norm,
            precision=options.precision,
        )
        if config["zero_optimization"]["stage"] not in ZERO_STAGES:
            raise UserError(
                "DeepSpeedTrainer supports ZeRO stages 0, 1, 2 and 3; the config asks for "
                f"{config['zero_optimization']['stage']!r}"
            )
        if (optimizer is None) == ("optimizer" not in config):
            raise UserError(
                "DeepSpeedTrainer needs exactly one optimizer: pass one (or a factory) or define "
                f'"optimizer" in the DeepSpeed config, not {"both" if optimizer is not None else "neither"}'
            )
        scheduler = options.scheduler
        if scheduler is not None and "scheduler" in config:
            raise UserError('an LR scheduler was passed and the DeepSpeed config defines "scheduler" too: give one')
        deepspeed = import_deepspeed()
        # our launcher detection and world-size check first; DeepSpeed then adopts the group
        info = init_distributed(plan, self.backend, collective_timeout=self.collective_timeout)
        # DeepSpeed asserts LOCAL_RANK (or OpenMPI's) is set; a plain `python script.py` has neither
        if "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_LOCAL_RANK" not in os.environ:
            os.environ["LOCAL_RANK"] = str(info.local_rank)
        if info.device.type == "cpu":
            from trainers.strategies.deepspeed_ops import load_comm_ops

            load_comm_ops()  # never wait on a lock file a killed process left behind
        model.to(info.device)
        if optimizer is not None and not _is_optimizer(optimizer):
            optimizer = optimizer(model.parameters())
        # A scheduler factory is DeepSpeed's own convention: it calls it with the optimizer it steps.
        engine, _, _, engine_scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model.parameters() if optimizer is None else None,
            lr_scheduler=scheduler,
            config=config,
        )
        problems = engine_mismatches(
            plan,
            {
                "train_batch_size": engine.train_batch_size(),
                "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
                "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                "world_size": dist.get_world_size(),
                "data_parallel_size": engine.dp_world_size,
            },
        )
        if problems:
            raise EngineMismatch(
                "the DeepSpeed engine disagrees with the batch plan: "
                + "; ".join(problems)
                + ". Let the plan write the batch keys (drop them from your DeepSpeed JSON) and start as many "
                "processes as the plan's world size."
            )
        self.engine, self.config, self.plan = engine, config, plan
        self.model, self.module, self.optimizer, self.scheduler = (
            engine,
            engine.module,
            engine.optimizer,
            engine_scheduler,
        )
        self.dist, self.device, self.dp_rank, self.dp_size = info, info.device, info.rank, info.world_size
        self.precision = options.precision
        self.track_grad_norm = options.track_grad_norm
        self.zero_stage = int(config["zero_optimization"]["stage"])
        self._params = [p for p in engine.module.parameters() if p.requires_grad]
        # ZeRO 0 in fp32 hands the torch optimizer param.grad directly: the norm is ours to take.
        self._norm_from_params = self.zero_stage == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
        self.collectives = CollectiveCounter().install() if self.count_collectives else None
        return plan

    def describe(self, plan: BatchPlan) -> str:
        info = self.dist
        return (
            f"gradaccum: DeepSpeed ZeRO {self.zero_stage} ({info.backend}) on {info.world_size} process(es) "
            f"({info.launcher or 'single'}), plan:\n"
            + plan.describe()
            + (
                f"\nZeRO {self.zero_stage} partitions gradients: DeepSpeed reduces them on every micro-step, by design"
                if self.zero_stage >= 2 and plan.gradient_accumulation_steps > 1
                else ""
            )
        )

    # ------------------------------------------------------------------ seams
    # no_sync stays a no-op: DeepSpeed's micro-step counter decides when to communicate.
    def backward(self, loss: torch.Tensor) -> None:
        if self.collectives is not None:
            self.collectives.begin_backward()
        try:
            # The loss is already normalised by the shared loop: DeepSpeed must not divide by K again.
            self.engine.backward(loss, scale_wrt_gas=False)
        finally:
            if self.collectives is not None:
                self.collectives.end_backward()
        if not self.engine.is_gradient_accumulation_boundary():
            # Off the boundary, step() only advances DeepSpeed's micro-step counter. The
            # boundary's step() comes from optimizer_step, after any gradient scaling.
            self.engine.step()

    def optimizer_step(self) -> float | None:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"DeepSpeed's micro-step counter ({self.engine.micro_steps}) is not at an accumulation boundary "
                f"after {self.plan.gradient_accumulation_steps} micro-steps: step() was called outside the trainer"
            )
        # our own pass over the gradients only when asked; the engine's norm (when it took one) is free
        norm = grad_norm(self._params) if self._norm_from_params and self.track_grad_norm else None
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def scale_gradients(self, factor: float) -> None:
        """Multiply the reduced gradients, wherever this engine keeps them, by `factor`."""
        if factor == 1.0:
            return
        if self.engine.zero_use_cpu_optimizer():
            # ZeRO-Offload copies the reduced gradients into the CPU optimizer's own buffers,
            # out of reach of the public fragment mapping (measured: scaling it changes nothing).
            raise UserError(
                "with ZeRO-Offload (offload_optimizer) a (loss_sum, count) loss needs Task.count (count=...): the "
                "trainer then scales each micro-step's loss before backward, which is exact; scaling the offloaded "
                "gradients afterwards is not"
            )
        if self.zero_stage == 3:
            torch._foreach_mul_(self._zero3_gradient_partitions(), factor)
            return
        grads, partitioned = [], False
        for p in self._params:
            if hasattr(p, "_hp_mapping"):
                # ZeRO 1/2 (and DeepSpeed's bf16 optimizer): this rank's slice of the reduced
                # fp32 gradient, the tensor DeepSpeed's own safe_set_full_grad writes to
                partitioned = True
                if p._hp_mapping is not None:  # None: no part of p lives in this rank's partition
                    grads.append(p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group))
            elif p.grad is not None:
                grads.append(p.grad)  # ZeRO 0: the optimizer reads param.grad (None: p was unused)
        if self.zero_stage >= 1 and not partitioned:
            raise UserError(
                "this DeepSpeed configuration keeps its gradients where the trainer cannot scale them exactly; "
                "give the task a count function (Task.count / count=...) so that each micro-step's loss is "
                "scaled before backward instead"
            )
        if grads:
            torch._foreach_mul_(grads, factor)

    def _zero3_gradient_partitions(self) -> list[torch.Tensor]:
        """ZeRO 3: this rank's reduced fp32 gradient partition, as the views the optimizer steps from.

        Parameters carry no `_hp_mapping` at stage 3; DeepSpeed refills
        `optimizer.averaged_gradients` (sub-group -> views into its fp32 gradient buffer)
        after every backward, since stage 3 reduces on every micro-step.
        """
        groups = getattr(self.engine.optimizer, "averaged_gradients", None)
        if not isinstance(groups, dict):
            raise UserError(
                "this DeepSpeed version keeps ZeRO 3 gradients where the trainer cannot scale them exactly; "
                "give the task a count function (Task.count / count=...) so that each micro-step's loss is "
                "scaled before backward instead"
            )
        return [g for group in groups.values() if group is not None for g in group]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)  # plain torch.distributed: not counted as gradient communication
        return tensor

    def begin_step(self) -> None:
        if self.collectives is not None:
            self.collectives.reset()

    def end_step(self, metrics: StepMetrics) -> None:
        if self.collectives is not None:
            metrics.allreduce_rounds = self.collectives.rounds
            self.last_collective_calls = dict(self.collectives.calls)

    def step_was_skipped(self) -> bool:
        # fp16: DeepSpeed's loss scaler skipped the update after an overflow
        return not self.engine.was_step_applied()

    def check_oom_fallback(self) -> str | None:
        return None  # never reached: supports_plan_change is False

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """At ZeRO 3 the module holds empty partitions: the fp32 masters, gathered (collective)."""
        return self.fp32_state_dict() if self.zero_stage == 3 else self.module.state_dict()

    def replicated_parameters(self) -> list[torch.Tensor]:
        """ZeRO 3 shards the parameters: no rank holds a replica to compare."""
        return [] if self.zero_stage == 3 else list(self.module.parameters())

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """See DeepSpeedTrainer.fp32_state_dict (collective: every rank calls it)."""
        state = {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
        from deepspeed.utils import safe_get_full_fp32_param

        if self.zero_stage == 3:
            # the module's parameters are empty partitions: gather each one's fp32 master copy
            for name, p in self.module.named_parameters():
                if name in state:
                    state[name] = safe_get_full_fp32_param(p).detach().reshape(p.ds_shape).clone()
            return state
        if not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
            return state

        optimizer = self.engine.optimizer
        # ZeRO 0 in 16 bits (DeepSpeed's unfused fp16/bf16 optimizer): a full fp32 copy per parameter
        lp_groups, hp_groups = getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])
        masters = {
            id(lp): hp
            for lp_group, hp_group in zip(lp_groups, hp_groups, strict=True)
            for lp, hp in zip(lp_group, hp_group, strict=True)
        }
        for name, p in self.module.named_parameters():
            full = masters.get(id(p))
            if full is None:
                full = safe_get_full_fp32_param(p)  # ZeRO 1/2: gathers the partitions (all-reduce)
            if full is not None and name in state:
                state[name] = full.detach().reshape(p.shape).clone()
        return state

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer and scheduler live in the engine (ZeRO 1-3: fp32 master copies
        partitioned over the ranks) and go into DeepSpeed's own files (write_files)."""
        return {
            "model": None,
            "optimizer": None,
            "scheduler": None,
            "precision": None,
            "backend": "deepspeed",
            "zero_stage": self.zero_stage,
        }

    def write_files(self, tmp_dir: Path) -> None:
        """Every rank: DeepSpeed writes its own files into the checkpoint."""
        directory = Path(tmp_dir) / CHECKPOINT_SUBDIR
        # universal_checkpoint_info: what ds_to_universal needs to convert these files later
        self.engine.save_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, client_state={UNIVERSAL_INFO_KEY: {}}, save_latest=False
        )
        if self.dist.rank == 0:
            from launcher.atomic import write_json_atomic

            layout = {"zero_stage": self.zero_stage, "data_parallel_size": self.plan.data_parallel_size}
            write_json_atomic(directory / LAYOUT_FILE, {**layout, "precision": self.precision})

    def read_files(self, checkpoint_dir: Path) -> None:
        """Restore the engine (weights, fp32 master copies, optimizer, scheduler) from a checkpoint."""
        from launcher.atomic import parse_json
        from trainers.checkpoint import CheckpointError
        from trainers.strategies import deepspeed_universal

        directory = Path(checkpoint_dir) / CHECKPOINT_SUBDIR
        layout = directory / LAYOUT_FILE
        try:
            text = layout.read_text()
        except (OSError, UnicodeDecodeError):
            raise CheckpointError(
                f"{checkpoint_dir} has no DeepSpeed engine files ({layout} is missing or unreadable): "
                "it was not written by DeepSpeedTrainer; resume it with the trainer that wrote it"
            ) from None
        saved = parse_json(text, str(layout), CheckpointError)
        if not isinstance(saved, dict) or not {"zero_stage", "data_parallel_size"} <= saved.keys():
            raise CheckpointError(f"{layout} does not say the ZeRO stage and data-parallel size: it is damaged")
        problem = resume_problem(saved, self.zero_stage, self.plan.data_parallel_size, self.precision)
        if problem:
            raise CheckpointError(f"cannot resume {checkpoint_dir} here: {problem}")
        if needs_universal(saved, self.plan.data_parallel_size):
            deepspeed_universal.resume(self.engine, directory, CHECKPOINT_TAG, saved, self.plan.data_parallel_size)
            return
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load its checkpoint from {directory}")

    def close(self) -> None:
        if self.collectives is not None:
            self.collectives.uninstall()
            self.collectives = None
