"""DiffusionSettings: environment prefix, defaults and self-consistency."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from storyreel_diffusion.settings import DiffusionSettings


def test_settings_come_from_the_diffusion_prefix_and_ignore_others(monkeypatch):
    monkeypatch.setenv("STORYREEL_DIFFUSION_DEFAULT_STEPS", "7")
    monkeypatch.setenv("STORYREEL_DIFFUSION_MODEL", "/models/sd15")
    monkeypatch.setenv("STORYREEL_DIFFUSION_SOMETHING_ELSE", "ignored")
    monkeypatch.setenv("STORYREEL_LLM_PORT", "1234")
    settings = DiffusionSettings()
    assert settings.default_steps == 7
    assert settings.model == "/models/sd15"
    assert settings.port == 50052


def test_documented_defaults():
    settings = DiffusionSettings(_env_file=None)
    # 0: the model's native size (512 for SD 1.5, 1024 for SDXL).
    assert (settings.default_width, settings.default_height) == (0, 0)
    assert (settings.default_steps, settings.default_guidance) == (25, 7.5)
    assert (settings.max_scenes, settings.max_side, settings.max_steps) == (24, 4096, 150)
    assert (settings.model, settings.device) == ("models/tiny-sd", "auto")
    assert (settings.consistency, settings.scheduler) == ("seed_lock", "default")
    assert (settings.max_batch_size, settings.max_queue, settings.cache_enabled) == (4, 8, True)
    assert (settings.metrics_port, settings.ip_adapter) == (0, "")


def test_list_settings_come_from_json_in_the_environment(monkeypatch):
    monkeypatch.setenv("STORYREEL_DIFFUSION_ATTENTION_LAYERS", '["up_blocks.1", "mid_block"]')
    assert DiffusionSettings().attention_layers == ["up_blocks.1", "mid_block"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"default_width": 500},
        {"default_height": 8192},
        {"default_steps": 200},
        {"default_guidance": 40.0},
        {"warmup_side": 60},
        {"attention_strength": 3.0},
        {"portrait_prompt": "portrait of {who}"},
        {"cache_prefix": "../cache"},
        {"max_queue": 0},
    ],
)
def test_defaults_outside_the_limits_are_refused(overrides):
    with pytest.raises(ValidationError):
        DiffusionSettings(**overrides)
