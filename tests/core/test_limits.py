"""The shared scene bounds (storyreel.limits): every setting and every contract holds to them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from storyreel.limits import MAX_SCENES, MIN_SCENES

PROTOS = Path(__file__).resolve().parents[2] / "protos"
#: A range in a comment sentence about a number of scenes: "1 to 24", "1..24".
_RANGE = re.compile(r"(\d+)\s*(?:\.\.|to)\s*(\d+)")
_ABOUT_SCENES = re.compile(r"\bscenes\b|scene_count|scene count", re.IGNORECASE)


def _comment_blocks(text: str):
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            block.append(stripped.removeprefix("//").strip())
        elif block:
            yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


def _scene_ranges_in_protos() -> list[tuple[str, int, int]]:
    found = []
    for path in sorted(PROTOS.rglob("*.proto")):
        for block in _comment_blocks(path.read_text()):
            for sentence in re.split(r"(?<=[.;:])\s+", block):
                if _ABOUT_SCENES.search(sentence):
                    for low, high in _RANGE.findall(sentence):
                        found.append((f"{path.name}: {sentence}", int(low), int(high)))
    return found


def test_every_proto_comment_states_the_shared_scene_bounds():
    ranges = _scene_ranges_in_protos()
    # The gateway, LLM (twice), diffusion and composer contracts state the bounds.
    assert len(ranges) >= 5, ranges
    wrong = [where for where, low, high in ranges if (low, high) != (MIN_SCENES, MAX_SCENES)]
    assert not wrong, f"comments state bounds other than {MIN_SCENES} to {MAX_SCENES}: {wrong}"


def _settings_classes():
    from storyreel_composer.settings import ComposerSettings
    from storyreel_diffusion.settings import DiffusionSettings
    from storyreel_gateway.settings import GatewaySettings
    from storyreel_llm.settings import LLMSettings

    return [LLMSettings, DiffusionSettings, ComposerSettings, GatewaySettings]


@pytest.mark.parametrize("cls", _settings_classes(), ids=lambda cls: cls.__name__)
def test_each_service_defaults_to_the_shared_maximum_and_never_exceeds_it(cls):
    assert cls(_env_file=None).max_scenes == MAX_SCENES
    narrow = {"max_scenes": MIN_SCENES}
    if "default_scenes" in cls.model_fields:
        narrow["default_scenes"] = MIN_SCENES
    assert cls(_env_file=None, **narrow).max_scenes == MIN_SCENES
    with pytest.raises(ValidationError):
        cls(_env_file=None, max_scenes=MAX_SCENES + 1)
    with pytest.raises(ValidationError):
        cls(_env_file=None, max_scenes=MIN_SCENES - 1)
