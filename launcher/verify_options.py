"""`gradaccum verify`'s options: defaults and checks, once, without torch.

`check(VerifyOptions(...))` validates every option, resolves the defaults (tolerance by
precision, the plan from the batch flags) and renders the DeepSpeed config under the plan,
so that bad input fails before torch is imported or a process starts. Both the command line
(launcher/cli/verify.py) and the library (`trainers.verify.verify`) go through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from launcher.errors import UserError
from launcher.plan import PRECISIONS, BatchPlan
from launcher.trainer_backends import DEFAULT_TRAINER_BACKEND, backend_names, check_blocks, trainer_backend

DEFAULT_TASK = "trainers.example:task"
DEFAULT_MICRO_BATCH_SIZE = 4
DEFAULT_ACCUMULATION_STEPS = 3
#: default --tolerance (max relative parameter difference against the fp32 reference) for the
#: precision of the distributed run; the measurements behind them are in the README, "Mixed precision"
DEFAULT_TOLERANCES = {"fp32": 1e-5, "bf16": 1.0, "fp16": 1e-1}
#: the trainers' default --collective-timeout (trainers.distributed.DEFAULT_COLLECTIVE_TIMEOUT_S)
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


@dataclasses.dataclass
class VerifyOptions:
    task: str = DEFAULT_TASK
    global_batch_size: int | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    nproc_per_node: int = 2
    steps: int = 4
    shuffle: bool = True
    output_dir: str = "gradaccum-verify"
    tolerance: float | None = None  # None: the default for the precision (DEFAULT_TOLERANCES)
    sync_every_micro_step: bool = False
    backend: str = DEFAULT_TRAINER_BACKEND
    zero_stage: int | None = None  # --backend deepspeed: None means the JSON's stage, or 0
    deepspeed_config: str | None = None  # --backend deepspeed: the user's DeepSpeed JSON
    fsdp_blocks: str | None = None  # --backend fsdp: the block spec (checked against the model by verify)
    precision: str = "fp32"  # of the distributed run; the reference is always fp32
    collective_timeout: float | None = None  # seconds; None: the trainers' default
    interrupt_at_step: int | None = None  # SIGKILL after this step's checkpoint, then resume
    resume_nproc_per_node: int | None = None  # resume at this many processes (same global batch)


@dataclasses.dataclass(frozen=True)
class CheckedOptions:
    """Options that passed `check`: tolerance resolved, the plan (with the precision), and the
    rendered DeepSpeed config (None for other backends)."""

    options: VerifyOptions
    plan: BatchPlan
    deepspeed_config: dict[str, Any] | None


def check(opts: VerifyOptions) -> CheckedOptions:
    """Every check, in the order a user fixes them; raises UserError naming the flag."""
    check_options(opts.backend, opts.steps, opts.nproc_per_node, opts.tolerance, opts.task)
    check_blocks(opts.backend, opts.fsdp_blocks)
    check_precision_options(opts.precision, opts.collective_timeout)
    opts = dataclasses.replace(opts, tolerance=resolve_tolerance(opts.tolerance, opts.precision))
    plan = resolve_plan(
        opts.global_batch_size, opts.micro_batch_size, opts.gradient_accumulation_steps, opts.nproc_per_node
    )
    check_interrupt_options(opts.steps, opts.interrupt_at_step, opts.resume_nproc_per_node, plan)
    ds_config = check_backend_options(
        opts.backend,
        plan,
        opts.zero_stage,
        opts.deepspeed_config,
        opts.sync_every_micro_step,
        opts.precision,
    )
    # the workers read the precision from the plan
    return CheckedOptions(opts, dataclasses.replace(plan, precision=opts.precision), ds_config)


def resolve_tolerance(tolerance: float | None, precision: str) -> float:
    """--tolerance, or the default for the precision of the distributed run."""
    return DEFAULT_TOLERANCES[precision] if tolerance is None else tolerance


def check_precision_options(precision: str, collective_timeout: float | None) -> None:
    """--precision / --collective-timeout."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if collective_timeout is not None and not 0 < collective_timeout < float("inf"):
        raise UserError(
            f"--collective-timeout must be a positive number of seconds, got {collective_timeout}; "
            f"the default is {DEFAULT_COLLECTIVE_TIMEOUT_S:g}"
        )


def resolve_plan(
    global_batch_size: int | None, micro_batch_size: int | None, accumulation_steps: int | None, world_size: int
) -> BatchPlan:
    """The flags' plan; what is not given defaults to micro 4 × accumulation 3 per rank."""
    g, m, k = global_batch_size, micro_batch_size, accumulation_steps
    if g is None:
        m = DEFAULT_MICRO_BATCH_SIZE if m is None else m
        k = DEFAULT_ACCUMULATION_STEPS if k is None else k
    elif m is None and k is None:
        return BatchPlan.solve(g, world_size=world_size, max_micro_batch_size=DEFAULT_MICRO_BATCH_SIZE)
    return BatchPlan.solve(g, m, k, world_size=world_size)


def _one_of(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_options(backend: str, steps: int, nproc_per_node: int, tolerance: float | None, task: str = "m:f") -> None:
    """--task, --backend, --steps, --nproc-per-node, --tolerance."""
    module, sep, function = task.partition(":")
    if not (module and sep and function):
        raise UserError(f"--task must look like MODULE:FUNCTION (e.g. trainers.example:task), got {task!r}")
    if backend not in backend_names():
        raise UserError(f"--backend must be {_one_of(backend_names())}, got {backend!r}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if tolerance is not None and not tolerance > 0:
        raise UserError(f"--tolerance must be positive, got {tolerance}")


def check_backend_options(
    backend: str,
    plan: BatchPlan,
    zero_stage: int | None = None,
    deepspeed_config: str | None = None,
    sync_every_micro_step: bool = False,
    precision: str | None = None,
) -> dict | None:
    """DeepSpeed flags, before any process starts: the JSON is read and rendered under the plan
    here, so batch keys that disagree with it fail now, naming both values. Returns the config."""
    stages = trainer_backend(backend).zero_stages
    if not stages:
        if zero_stage is not None or deepspeed_config is not None:
            raise UserError("--zero-stage and --deepspeed-config are for --backend deepspeed")
        return None
    if sync_every_micro_step:
        raise UserError("--sync-every-micro-step is a DDP demonstration; DeepSpeed decides when it communicates")
    if precision not in (None, "fp32"):
        raise UserError(
            f"--backend deepspeed --precision {precision}: DeepSpeed casts the model to {precision} at start-up, so "
            "its weights differ from the fp32 reference before the first step and verify cannot compare them. "
            "Verify DeepSpeed in fp32, and 16-bit accumulation with --backend ddp; the README's DeepSpeed section gives "
            "DeepSpeed's measured bf16 figures"
        )
    from launcher import configs

    path = deepspeed_config
    base = configs.load_json_file(path, "DeepSpeed config (--deepspeed-config)") if path else None
    config = configs.deepspeed_config(plan, base, zero_stage=zero_stage, precision=precision)
    stage = config["zero_optimization"]["stage"]
    if stage not in stages:
        raise UserError(
            f"gradaccum verify runs DeepSpeed at ZeRO stages {_one_of(tuple(map(str, stages))).replace(' or ', ' and ')}; "
            f"the config asks for {stage}"
        )
    # --resume-nproc-per-node at another size works at every stage: ZeRO 1-3 state is converted
    # to DeepSpeed's universal checkpoint on resume (trainers/strategies/deepspeed_universal.py)
    return config


def check_interrupt_options(
    steps: int, interrupt_at_step: int | None, resume_nproc_per_node: int | None, plan: BatchPlan
) -> None:
    """--interrupt-at-step / --resume-nproc-per-node."""
    if interrupt_at_step is None:
        if resume_nproc_per_node is not None:
            raise UserError("--resume-nproc-per-node needs --interrupt-at-step S (after which step to kill the run)")
        return
    if not 1 <= interrupt_at_step < steps:
        raise UserError(
            f"--interrupt-at-step must be between 1 and {steps - 1} (--steps {steps}: steps must be left to resume), "
            f"got {interrupt_at_step}"
        )
    if resume_nproc_per_node is not None:
        if resume_nproc_per_node < 1:
            raise UserError(f"--resume-nproc-per-node must be at least 1, got {resume_nproc_per_node}")
        plan.with_world_size(resume_nproc_per_node)  # PlanError names the world sizes that keep the batch
