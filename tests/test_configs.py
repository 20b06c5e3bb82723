"""DeepSpeed JSON and DDP configs rendered from the plan; DeepSpeed's own parser must agree."""

from __future__ import annotations

import contextlib
import json

import pytest

from launcher import BatchPlan
from launcher.configs import ConfigError, ddp_config, deepspeed_config


class _FakeDist:
    """Stands in for deepspeed.comm while DeepSpeedConfig reads rank and world size.

    Without a process group DeepSpeedConfig silently assumes world size 1 (its
    get_rank() call fails and is caught), which would hide a wrong triad.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_rank(self, group=None):
        return 0

    def get_world_size(self, group=None):
        return self.world_size


@contextlib.contextmanager
def deepspeed_world(world_size: int):
    import deepspeed.runtime.config as ds_config

    real = ds_config.dist
    ds_config.dist = _FakeDist(world_size)
    try:
        yield ds_config.DeepSpeedConfig
    finally:
        ds_config.dist = real


@pytest.mark.deepspeed
@pytest.mark.parametrize("g, m, world, stage", [(96, 4, 8, 0), (64, 2, 2, 1), (12, 3, 4, 2), (7, 7, 1, 0)])
def test_deepspeed_parser_reads_back_the_plan(g, m, world, stage):
    plan = BatchPlan.solve(g, m, world_size=world)
    config = deepspeed_config(plan, zero_stage=stage)
    with deepspeed_world(world) as DeepSpeedConfig:
        parsed = DeepSpeedConfig(json.loads(json.dumps(config)))
    assert parsed.train_batch_size == plan.global_batch_size
    assert parsed.train_micro_batch_size_per_gpu == plan.micro_batch_size
    assert parsed.gradient_accumulation_steps == plan.gradient_accumulation_steps
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 0.0


@pytest.mark.deepspeed
def test_deepspeed_parser_rejects_the_same_json_at_another_world_size():
    # The check above is not vacuous: the parser does verify the triad against the world.
    config = deepspeed_config(BatchPlan.solve(96, 4, world_size=8))
    with deepspeed_world(4) as DeepSpeedConfig, pytest.raises(AssertionError):
        DeepSpeedConfig(config)


def test_base_config_is_merged_and_conflicts_name_both_values():
    plan = BatchPlan.solve(32, 4, world_size=2)
    base = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "train_micro_batch_size_per_gpu": 4}
    config = deepspeed_config(plan, base)
    assert config["optimizer"]["type"] == "Adam" and config["gradient_accumulation_steps"] == 4
    assert "zero_allow_untested_optimizer" not in config
    with pytest.raises(ConfigError, match=r"train_batch_size=64 but the plan has global_batch_size=32"):
        deepspeed_config(plan, {"train_batch_size": 64})
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=2 but --zero-stage is 1"):
        deepspeed_config(plan, {"zero_optimization": {"stage": 2}}, zero_stage=1)
    assert base == {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "train_micro_batch_size_per_gpu": 4}


def test_precision_blocks_come_from_the_plan():
    plan = BatchPlan.solve(8, 2, world_size=2, precision="bf16")
    assert deepspeed_config(plan)["bf16"] == {"enabled": True}
    assert "fp16" not in deepspeed_config(plan)
    with pytest.raises(ConfigError, match="enables fp16 but the plan's precision is bf16"):
        deepspeed_config(plan, {"fp16": {"enabled": True}})


def test_zero_stage_one_with_torch_optimizer_is_allowed_explicitly():
    config = deepspeed_config(BatchPlan.solve(8, 2, world_size=2), zero_stage=1)
    assert config["zero_allow_untested_optimizer"] is True


def test_ddp_config():
    cfg = ddp_config(BatchPlan.solve(24, 3, world_size=2))
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["no_sync_micro_steps"] == 3


@pytest.mark.deepspeed
def test_a_rendered_default_is_replaced_by_an_explicit_setting_later():
    # `gradaccum launch` renders the JSON (clipping defaulted to 0.0); a trainer whose task
    # clips at 1.0 then takes it as its base: that is not the user's conflict.
    plan = BatchPlan.solve(8, 2, world_size=2)
    rendered = json.loads(json.dumps(deepspeed_config(plan)))
    assert rendered["gradient_clipping"] == 0.0 and rendered["gradaccum_defaults"] == ["gradient_clipping"]
    again = deepspeed_config(plan, rendered, gradient_clipping=1.0)
    assert again["gradient_clipping"] == 1.0 and "gradaccum_defaults" not in again
    with deepspeed_world(2) as DeepSpeedConfig:
        assert DeepSpeedConfig(rendered).gradient_clipping == 0.0  # DeepSpeed ignores the marker
    # A value the user wrote still conflicts.
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 but the trainer asks for 1.0"):
        deepspeed_config(plan, {"gradient_clipping": 0.5}, gradient_clipping=1.0)


@pytest.mark.parametrize(
    "text, key",
    [
        ('{"train_batch_size": 24, "train_batch_size": 32}', "train_batch_size"),
        ('{"gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}', "gradient_clipping"),
        ('{"zero_optimization": {"stage": 1, "stage": 2}}', "stage"),
    ],
)
def test_a_key_given_twice_is_refused_naming_key_and_file(tmp_path, text, key):
    from launcher.configs import load_json_file

    path = tmp_path / "base.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_json_file(path, "base DeepSpeed config")
    assert f"'{key}' more than once" in str(e.value) and str(path) in str(e.value)


def test_a_plan_file_with_a_key_given_twice_is_refused(tmp_path):
    from launcher.plan import PlanError

    path = tmp_path / "plan.json"
    text = BatchPlan.solve(8, 2, world_size=2).to_json()
    path.write_text(text.replace('"world_size": 2', '"world_size": 2, "world_size": 4'))
    with pytest.raises(PlanError, match="'world_size' more than once"):
        BatchPlan.from_file(path)
