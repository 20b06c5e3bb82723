"""DeepSpeed JSON and DDP settings rendered from a BatchPlan (pure: dicts in, dicts out)."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from launcher.atomic import read_json
from launcher.errors import UserError
from launcher.plan import BatchPlan

#: DeepSpeed key -> BatchPlan attribute. The plan is the only source of these.
DEEPSPEED_BATCH_KEYS = {
    "train_batch_size": "global_batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
}


#: top-level key listing the settings gradaccum defaulted (DeepSpeed ignores unknown keys)
DEFAULTED_KEY = "gradaccum_defaults"


class ConfigError(UserError):
    """A user's config file disagrees with the plan or cannot be read."""


def load_json_file(path: str | os.PathLike[str], what: str = "config") -> dict[str, Any]:
    data = read_json(path, what, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_batch_keys(plan: BatchPlan, config: Mapping[str, Any], source: str = "the base config") -> None:
    """Raise if `config` sets a batch key to something other than the plan's value."""
    for key, attr in DEEPSPEED_BATCH_KEYS.items():
        if key in config and config[key] not in (None, "auto") and config[key] != getattr(plan, attr):
            raise ConfigError(
                f"{source} sets {key}={config[key]!r} but the plan has {attr}={getattr(plan, attr)}; "
                f"remove {key} from {source} (the plan writes it) or change the plan flags"
            )


def deepspeed_config(
    plan: BatchPlan,
    base: Mapping[str, Any] | None = None,
    zero_stage: int | None = None,
    gradient_clipping: float | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config whose batch keys come from `plan`.

    `base` (a user's JSON) is merged in; a batch key in it that disagrees with the
    plan is an error naming both values, never silently overwritten. Settings that
    DeepSpeed would otherwise default behind the user's back (gradient clipping at
    1.0 in 0.19) are written explicitly.
    """
    config: dict[str, Any] = copy.deepcopy(dict(base or {}))
    # Keys an earlier rendering filled in with a default (not the user's choice): a later,
    # explicit setting replaces them instead of conflicting (a JSON from `gradaccum launch`
    # handed to DeepSpeedTrainer, whose task asks for clipping, say).
    defaulted = set(config.pop(DEFAULTED_KEY, []))
    check_batch_keys(plan, config)
    for key, attr in DEEPSPEED_BATCH_KEYS.items():
        config[key] = getattr(plan, attr)

    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization must be an object, got {zero!r}")
    base_stage = zero.get("stage")
    if zero_stage is None:
        zero_stage = 0 if base_stage is None else base_stage
    elif base_stage is not None and base_stage != zero_stage:
        raise ConfigError(
            f"the base config sets zero_optimization.stage={base_stage} but --zero-stage is "
            f"{zero_stage}; give one of them"
        )
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    zero["stage"] = zero_stage

    if gradient_clipping is not None:
        if (
            "gradient_clipping" in config
            and "gradient_clipping" not in defaulted
            and config["gradient_clipping"] != gradient_clipping
        ):
            raise ConfigError(
                f"the base config sets gradient_clipping={config['gradient_clipping']} but the "
                f"trainer asks for {gradient_clipping}; give one of them"
            )
        config["gradient_clipping"] = float(gradient_clipping)
        defaulted.discard("gradient_clipping")
    elif "gradient_clipping" not in config:
        config["gradient_clipping"] = 0.0  # DeepSpeed would clip at 1.0 behind the user's back
        defaulted.add("gradient_clipping")

    precision = plan.precision if precision is None else precision
    _set_precision(config, precision)
    if "optimizer" not in config and zero_stage >= 1:
        # A torch optimizer passed to deepspeed.initialize is "untested" for ZeRO.
        config.setdefault("zero_allow_untested_optimizer", True)
    if defaulted:
        config[DEFAULTED_KEY] = sorted(defaulted)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def _set_precision(config: dict[str, Any], precision: str) -> None:
    wanted = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}
    if precision not in wanted:
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    for block in ("bf16", "fp16"):
        enabled = bool(config.get(block, {}).get("enabled", False))
        if enabled and wanted[precision] != block:
            raise ConfigError(
                f"the base config enables {block} but the plan's precision is {precision}; "
                f"set the precision with --precision only"
            )
        if wanted[precision] == block:
            config.setdefault(block, {})["enabled"] = True


def ddp_config(plan: BatchPlan, backend: str | None = None) -> dict[str, Any]:
    """The settings a DDP worker needs, in one JSON-able dict."""
    return {
        "backend": backend or "auto",
        "world_size": plan.world_size,
        "data_parallel_size": plan.data_parallel_size,
        "global_batch_size": plan.global_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "precision": plan.precision,
        "no_sync_micro_steps": plan.gradient_accumulation_steps - 1,
        "ddp": {
            "find_unused_parameters": False,
            "gradient_as_bucket_view": True,
            "broadcast_buffers": True,
            "bucket_cap_mb": 25,
        },
    }
