"""The storyboard domain model and the draft schema that constrains generation."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from storyreel_llm.storyboard import (
    Character,
    Scene,
    Storyboard,
    TextCaps,
    draft_model,
    draft_schema,
)

CAPS = TextCaps(title=40, name=20, appearance=60, narration=80, image_prompt=80, characters=2)


def draft(scene_count: int, **changes) -> dict:
    data = {
        "title": "The Fox and the Moon",
        "characters": [{"name": "Rin", "appearance": "a small red fox"}],
        "scenes": [
            {
                "narration": f"Rin looked up, night {i}.",
                "image_prompt": "a fox",
                "characters": ["Rin"],
            }
            for i in range(scene_count)
        ],
    }
    data.update(changes)
    return data


def test_draft_schema_fixes_the_scene_count_and_forbids_extra_keys():
    schema = draft_schema(3, CAPS)
    scenes = schema["properties"]["scenes"]
    assert (scenes["minItems"], scenes["maxItems"]) == (3, 3)
    assert schema["additionalProperties"] is False
    assert scenes["items"]["additionalProperties"] is False
    assert schema["properties"]["characters"]["maxItems"] == CAPS.characters
    assert scenes["items"]["properties"]["narration"]["maxLength"] == CAPS.narration


def test_draft_schema_has_no_refs_so_every_grammar_engine_takes_it():
    text = json.dumps(draft_schema(2, CAPS))
    assert "$ref" not in text and "$defs" not in text


def test_draft_schema_copies_are_independent():
    draft_schema(2, CAPS)["x-added-by-a-backend"] = True
    assert "x-added-by-a-backend" not in draft_schema(2, CAPS)


def test_draft_accepts_exactly_the_scene_count():
    model = draft_model(2, CAPS)
    assert len(model.model_validate(draft(2)).scenes) == 2
    for wrong in (1, 3):
        with pytest.raises(ValidationError, match="scenes"):
            model.model_validate(draft(wrong))


def test_draft_rejects_blank_and_overlong_text():
    model = draft_model(1, CAPS)
    with pytest.raises(ValidationError, match="title"):
        model.model_validate(draft(1, title="   "))
    with pytest.raises(ValidationError, match="title"):
        model.model_validate(draft(1, title="x" * (CAPS.title + 1)))


def test_draft_rejects_control_characters_in_text():
    with pytest.raises(ValidationError, match="title"):
        draft_model(1, CAPS).model_validate(draft(1, title="The Fox\u001d"))


def test_draft_rejects_scene_characters_missing_from_the_cast():
    data = draft(1)
    data["scenes"][0]["characters"] = ["Luna"]
    with pytest.raises(ValidationError, match="Luna"):
        draft_model(1, CAPS).model_validate(data)


def test_draft_limits_the_cast_size():
    cast = [{"name": f"C{i}", "appearance": "someone"} for i in range(CAPS.characters + 1)]
    with pytest.raises(ValidationError, match="characters"):
        draft_model(1, CAPS).model_validate(draft(1, characters=cast))


def test_storyboard_requires_scene_indexes_one_to_n():
    cast = (Character(name="Rin", appearance="a fox"),)
    scenes = tuple(Scene(index=i, narration="n", image_prompt="p") for i in (1, 3))
    with pytest.raises(ValidationError, match="indexes"):
        Storyboard(title="t", characters=cast, scenes=scenes, style="photo")


def test_storyboard_rejects_unknown_scene_characters():
    cast = (Character(name="Rin", appearance="a fox"),)
    scene = Scene(index=1, narration="n", image_prompt="p", characters=("Luna",))
    with pytest.raises(ValidationError, match="unknown characters"):
        Storyboard(title="t", characters=cast, scenes=(scene,), style="photo")


def test_storyboard_needs_at_least_one_character():
    scene = Scene(index=1, narration="n", image_prompt="p")
    with pytest.raises(ValidationError, match="characters"):
        Storyboard(title="t", characters=(), scenes=(scene,), style="photo")
