"""The TGI backend, and the writer's checks and repairs, against a TGI test double over HTTP."""

from __future__ import annotations

import json
import socket

import pytest
from storyreel_llm.backends import create_backend
from storyreel_llm.backends.tgi import TGIBackend
from storyreel_llm.storyboard import draft_schema
from storyreel_llm.writer import StoryboardWriter

from storyreel.errors import Overloaded, UpstreamFailed

MESSAGES = [
    {"role": "system", "content": "You write storyboards."},
    {"role": "user", "content": 'Story idea: "a fox"'},
]


def good_answer(scene_count: int, **changes) -> str:
    data = {
        "title": "The Fox and the Moon",
        "characters": [{"name": "Rin", "appearance": "a small red fox with a white tail"}],
        "scenes": [
            {
                "narration": f"Rin climbed hill number {i}.",
                "image_prompt": f"a fox on hill {i} at night",
                "characters": ["Rin"],
            }
            for i in range(1, scene_count + 1)
        ],
    }
    data.update(changes)
    return json.dumps(data)


@pytest.fixture
def tgi_settings(settings_for, tgi_double):
    return settings_for(backend="tgi", tgi_url=tgi_double.url, tgi_startup_poll_s=0.01)


def test_backend_setting_tgi_selects_the_tgi_backend(tgi_settings):
    assert isinstance(create_backend(tgi_settings), TGIBackend)


def test_request_carries_zephyr_prompt_grammar_budget_stops_and_seed(tgi_settings, tgi_double):
    tgi_double.answer('{"ok": true}')
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    text = TGIBackend(tgi_settings).generate_json(MESSAGES, schema, max_new_tokens=321, seed=42)

    assert text == '{"ok": true}'
    (request,) = tgi_double.requests
    body = request["body"]
    assert body["inputs"] == (
        '<|system|>\nYou write storyboards.</s>\n<|user|>\nStory idea: "a fox"</s>\n<|assistant|>\n'
    )
    params = body["parameters"]
    assert params["grammar"] == {"type": "json", "value": schema}
    assert params["max_new_tokens"] == 321
    assert params["stop"] == ["</s>", "<|user|>"]
    assert params["seed"] == 42
    assert params["temperature"] == tgi_settings.temperature
    assert params["top_p"] == tgi_settings.top_p


def test_connection_refused_raises_upstream_failed_naming_the_url(settings_for):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    backend = TGIBackend(settings_for(backend="tgi", tgi_url=url))
    with pytest.raises(UpstreamFailed, match=f"cannot reach TGI server at {url}"):
        backend.generate_json(MESSAGES, {"type": "object"}, max_new_tokens=8, seed=1)


def test_server_error_raises_upstream_failed_naming_the_url(tgi_settings, tgi_double):
    tgi_double.fail(500, "CUDA out of memory", "generation")
    with pytest.raises(UpstreamFailed, match=f"TGI server at {tgi_double.url} failed"):
        TGIBackend(tgi_settings).generate_json(MESSAGES, {"type": "object"}, 8, 1)


def test_tgi_overloaded_raises_overloaded(tgi_settings, tgi_double):
    tgi_double.fail(429, "Model is overloaded", "overloaded")
    with pytest.raises(Overloaded, match="overloaded"):
        TGIBackend(tgi_settings).generate_json(MESSAGES, {"type": "object"}, 8, 1)


def test_load_waits_until_tgi_health_answers_200(tgi_settings, tgi_double):
    tgi_double.health_statuses[:] = [503, 503]
    TGIBackend(tgi_settings).load()
    assert tgi_double.health_checks == 3


def test_load_gives_up_with_upstream_failed_when_tgi_never_gets_ready(settings_for, tgi_double):
    tgi_double.health_statuses[:] = [503] * 1000
    settings = settings_for(
        backend="tgi",
        tgi_url=tgi_double.url,
        tgi_startup_timeout_s=0.05,
        tgi_startup_poll_s=0.01,
    )
    with pytest.raises(UpstreamFailed, match=f"TGI server at {tgi_double.url} is not ready"):
        TGIBackend(settings).load()


# --- The writer over TGI: parsing, numbering, styles, repairs ----------------------------


def test_writer_sends_the_draft_schema_for_the_requested_scene_count(tgi_settings, tgi_double):
    tgi_double.answer(good_answer(4))
    StoryboardWriter(TGIBackend(tgi_settings), tgi_settings).write("a fox", 4, "", seed=9)
    params = tgi_double.requests[0]["body"]["parameters"]
    assert params["grammar"]["value"] == draft_schema(4, tgi_settings.text_caps())
    assert params["max_new_tokens"] == tgi_settings.max_new_tokens(4)


def test_writer_numbers_scenes_and_prefixes_image_prompts_with_the_style(tgi_settings, tgi_double):
    tgi_double.answer(good_answer(3))
    writer = StoryboardWriter(TGIBackend(tgi_settings), tgi_settings)
    storyboard = writer.write("a fox", 3, "anime", seed=9)

    assert [s.index for s in storyboard.scenes] == [1, 2, 3]
    assert storyboard.style == "anime"
    prefix = tgi_settings.style_presets["anime"]
    for scene in storyboard.scenes:
        assert scene.image_prompt.startswith(prefix + ", a fox on hill")
        # The character's fixed look is repeated in every picture it is in.
        assert scene.image_prompt.endswith("a small red fox with a white tail")
    assert storyboard.degraded is False


def test_writer_merges_a_repeated_character_and_drops_unknown_scene_names(tgi_settings, tgi_double):
    cast = [
        {"name": "Rin", "appearance": "a small red fox"},
        {"name": "rin", "appearance": "another fox"},
    ]
    answer = json.loads(good_answer(1, characters=cast))
    answer["scenes"][0]["characters"] = ["RIN", "Luna"]
    tgi_double.answer(json.dumps(answer))

    storyboard = StoryboardWriter(TGIBackend(tgi_settings), tgi_settings).write("a fox", 1)

    assert [c.name for c in storyboard.characters] == ["Rin"]
    assert storyboard.scenes[0].characters == ("Rin",)
    assert len(tgi_double.requests) == 1


def test_writer_repairs_a_cut_off_answer_by_asking_again(tgi_settings, tgi_double):
    tgi_double.answer(good_answer(2)[:50])  # cut off at max_new_tokens
    tgi_double.answer(good_answer(2))
    storyboard = StoryboardWriter(TGIBackend(tgi_settings), tgi_settings).write("a fox", 2, seed=5)

    assert len(storyboard.scenes) == 2
    first, second = (r["body"] for r in tgi_double.requests)
    assert "not complete JSON" in second["inputs"]
    # Each attempt samples with a new seed so it does not repeat the mistake.
    assert second["parameters"]["seed"] == first["parameters"]["seed"] + 1


def test_writer_repair_names_the_validation_problem(tgi_settings, tgi_double):
    tgi_double.answer(good_answer(2, title=""))
    tgi_double.answer(good_answer(2))
    StoryboardWriter(TGIBackend(tgi_settings), tgi_settings).write("a fox", 2, seed=5)

    repair_prompt = tgi_double.requests[1]["body"]["inputs"]
    assert "title: String should have at least 1 character" in repair_prompt
    # A complete but wrong answer is shown back to the model as its own turn.
    assert '<|assistant|>\n{"title": ""' in repair_prompt


def test_writer_gives_up_with_upstream_failed_after_the_repair_attempts(settings_for, tgi_double):
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, repair_attempts=1)
    tgi_double.answer(good_answer(1))  # one scene where three were asked
    tgi_double.answer(good_answer(2))
    with pytest.raises(UpstreamFailed, match="no usable storyboard in 2 attempt") as caught:
        StoryboardWriter(TGIBackend(settings), settings).write("a fox", 3, seed=5)
    assert "scenes: List should have at least 3 items" in caught.value.message
    assert len(tgi_double.requests) == 2
