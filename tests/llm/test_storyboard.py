"""The storyboard domain model and the two drafts (cast, shot) whose schemas constrain decoding."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError
from storyreel_llm.prompts import INSTRUCTIONS
from storyreel_llm.storyboard import (
    CAMERAS,
    Character,
    DraftContext,
    Scene,
    Storyboard,
    TextCaps,
    cast_model,
    cast_schema,
    shot_model,
    shot_schema,
)

from storyreel.clip_count import clip_tokenizer

CAPS = TextCaps(
    title=40,
    logline=100,
    name=20,
    appearance=80,
    narration=120,
    setting=50,
    action=60,
    characters=2,
    characters_per_scene=2,
)


def cast(**changes) -> dict:
    data = {
        "title": "The Fox and the Moon",
        "logline": "A small fox climbs a hill to reach the moon.",
        "characters": [{"name": "Rin", "appearance": "a small red fox with a white tail"}],
    }
    data.update(changes)
    return data


def shot(**changes) -> dict:
    data = {
        "characters": ["Rin"],
        "setting": "on a grassy hill at night",
        "action": "Rin looks up at the moon",
        "camera": "wide shot",
    }
    data.update(changes)
    return data


def test_schemas_have_no_refs_so_every_grammar_engine_takes_them():
    for schema in (cast_schema(CAPS), shot_schema(CAPS)):
        text = json.dumps(schema)
        assert "$ref" not in text and "$defs" not in text
        assert schema["additionalProperties"] is False


def test_schemas_depend_only_on_the_caps_and_are_built_once():
    assert cast_model(CAPS) is cast_model(CAPS)
    assert shot_schema(CAPS) == shot_schema(CAPS)
    shot_schema(CAPS)["x-added-by-a-backend"] = True
    assert "x-added-by-a-backend" not in shot_schema(CAPS)


def test_schema_examples_are_valid_answers():
    """The examples in the schemas (the TGI test double answers with them) validate."""
    for schema, model in (
        (cast_schema(CAPS), cast_model(CAPS)),
        (shot_schema(CAPS), shot_model(CAPS)),
    ):
        example = {
            key: prop["examples"][0]
            if key != "characters" or "items" not in prop
            else prop["examples"][0]
            if "examples" in prop
            else [{k: v["examples"][0] for k, v in prop["items"]["properties"].items()}]
            for key, prop in schema["properties"].items()
        }
        jsonschema.validate(example, schema)
        model.model_validate(example)


def test_valid_drafts_pass_schema_and_model():
    jsonschema.validate(cast(), cast_schema(CAPS))
    jsonschema.validate(shot(), shot_schema(CAPS))
    cast_model(CAPS).model_validate(cast())
    shot_model(CAPS).model_validate(shot(), context=DraftContext(names=("Rin",)))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"title": "   "}, "title"),
        ({"title": "x" * 41}, "title"),
        ({"title": 'The "Fox"'}, "title"),
        ({"logline": "I am a helpful assistant."}, "logline"),
        ({"logline": "short"}, "logline"),
        ({"characters": []}, "characters"),
        ({"characters": [{"name": "rin", "appearance": "a red fox"}]}, "name"),
        ({"characters": [{"name": "Rin", "appearance": "Red fox"}]}, "appearance"),
        ({"characters": [{"name": "Rin", "appearance": 'a "fox"'}]}, "appearance"),
        (
            {"characters": [{"name": f"C{c}", "appearance": "a red fox"} for c in "abc"]},
            "characters",
        ),
        (
            {
                "characters": [
                    {"name": "Rin", "appearance": "a red fox"},
                    {"name": "RIN", "appearance": "a grey fox"},
                ]
            },
            "different name",
        ),
    ],
    ids=[
        "blank-title",
        "long-title",
        "quotes-in-title",
        "first-person-logline",
        "short-logline",
        "no-characters",
        "lower-case-name",
        "appearance-without-article",
        "quotes-in-appearance",
        "too-many-characters",
        "duplicate-names",
    ],
)
def test_cast_draft_rejects(changes, field):
    with pytest.raises(ValidationError, match=field):
        cast_model(CAPS).model_validate(cast(**changes))


def test_cast_draft_rejects_an_appearance_over_the_clip_token_cap():
    context = DraftContext(clip_tokens=clip_tokenizer().count, max_appearance_tokens=6)
    with pytest.raises(ValidationError, match="CLIP tokens long; make it at most 6"):
        cast_model(CAPS).model_validate(cast(), context=context)


def test_drafts_reject_answers_that_repeat_the_instructions():
    context = DraftContext(names=("Rin",), forbidden=INSTRUCTIONS)
    leaked = "Plan the picture for one scene of a storyboard"
    with pytest.raises(ValidationError, match="repeats the instructions"):
        shot_model(CAPS).model_validate(shot(action=leaked), context=context)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"camera": "dolly zoom"}, "camera"),
        ({"setting": "On a Hill"}, "setting"),
        ({"setting": "x"}, "setting"),
        ({"setting": "forest"}, "setting"),
        ({"action": "a" * 61}, "action"),
        ({"action": "Rin\\nlooks"}, "action"),
        ({"characters": ["Rin", "Luna", "Sol"]}, "characters"),
        ({"characters": ["Luna"]}, "not in the cast"),
    ],
    ids=[
        "unknown-camera",
        "capitalised-setting",
        "short-setting",
        "one-word-setting",
        "long-action",
        "escape-in-action",
        "too-many-in-picture",
        "unknown-character",
    ],
)
def test_shot_draft_rejects(changes, field):
    with pytest.raises(ValidationError, match=field):
        shot_model(CAPS).model_validate(shot(**changes), context=DraftContext(names=("Rin",)))


def test_every_camera_is_accepted():
    for camera in CAMERAS:
        shot_model(CAPS).model_validate(shot(camera=camera), context=DraftContext(names=("Rin",)))


def scenes(count: int, characters=()) -> tuple[Scene, ...]:
    return tuple(
        Scene(index=i, narration="n", image_prompt="p", characters=characters)
        for i in range(1, count + 1)
    )


def test_storyboard_requires_the_scene_count_it_is_validated_for():
    data = {"title": "t", "scenes": scenes(2), "style": "photo"}
    assert len(Storyboard.model_validate(data, context={"scene_count": 2}).scenes) == 2
    with pytest.raises(ValidationError, match="exactly 3 scenes"):
        Storyboard.model_validate(data, context={"scene_count": 3})


def test_storyboard_requires_scene_indexes_one_to_n():
    bad = (
        Scene(index=1, narration="n", image_prompt="p"),
        Scene(index=3, narration="n", image_prompt="p"),
    )
    with pytest.raises(ValidationError, match="indexes"):
        Storyboard(title="t", scenes=bad, style="photo")


def test_storyboard_rejects_unknown_scene_characters():
    cast_ = (Character(name="Rin", appearance="a fox"),)
    with pytest.raises(ValidationError, match="unknown characters"):
        Storyboard(title="t", characters=cast_, scenes=scenes(1, ("Luna",)), style="photo")


def test_storyboard_rejects_blank_narration_and_prompt():
    with pytest.raises(ValidationError):
        Scene(index=1, narration=" ", image_prompt="p")
    with pytest.raises(ValidationError):
        Scene(index=1, narration="n", image_prompt="")
