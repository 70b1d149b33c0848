"""The writer with the real SmolLM2-135M-Instruct, in process, under outlines' JSON grammar."""

from __future__ import annotations

import json

import jsonschema
import pytest
from storyreel_llm.storyboard import draft_schema
from storyreel_llm.writer import StoryboardWriter

pytestmark = pytest.mark.model


@pytest.mark.parametrize(
    ("prompt", "scene_count", "style"),
    [
        ("A lighthouse keeper befriends a lost whale", 3, "watercolor"),
        ("A robot learns to bake bread", 1, ""),
    ],
    ids=["lighthouse-3-scenes", "robot-1-scene"],
)
def test_smollm2_writes_a_valid_storyboard_with_exactly_the_scene_count(
    smollm2, settings_for, prompt, scene_count, style
):
    settings = settings_for()
    writer = StoryboardWriter(smollm2, settings)
    storyboard = writer.write(prompt, scene_count, style, seed=1234)

    assert len(storyboard.scenes) == scene_count
    assert [s.index for s in storyboard.scenes] == list(range(1, scene_count + 1))
    caps = settings.text_caps()
    assert 1 <= len(storyboard.characters) <= caps.characters
    assert storyboard.title and len(storyboard.title) <= caps.title
    names = {c.name for c in storyboard.characters}
    choice = writer.resolve_style(style)
    for scene in storyboard.scenes:
        assert scene.narration.strip() and len(scene.narration) <= caps.narration
        assert scene.image_prompt.startswith(choice.prompt_prefix + ", ")
        assert set(scene.characters) <= names
    assert storyboard.style == choice.name


def test_smollm2_raw_answer_obeys_the_json_schema_it_was_constrained_by(smollm2, settings_for):
    """Constrained decoding itself, before any tidying or repair, yields schema-valid JSON."""
    settings = settings_for()
    writer = StoryboardWriter(smollm2, settings)
    schema = draft_schema(1, settings.text_caps())
    answer = smollm2.generate_json(
        writer.messages("A girl and her kite on a windy beach", 1),
        schema,
        settings.max_new_tokens(1),
        seed=7,
    )
    data = json.loads(answer)
    jsonschema.validate(data, schema)
    assert len(data["scenes"]) == 1
