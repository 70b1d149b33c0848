"""The TGI backend on the wire, against a TGI test double (a real HTTP server).

TGI itself needs a GPU image and hub weights; the double records every request,
so these tests check the exact payload: prompt format, grammar, stop sequences,
token budget, seed; and the retries, timeouts and errors.
"""

from __future__ import annotations

import json

import pytest
from llm.story_doubles import CAST, answers_for, interrupted_load
from storyreel_llm.backends import create_backend
from storyreel_llm.backends.tgi import TGIBackend, zephyr_prompt
from storyreel_llm.storyboard import cast_schema, shot_schema
from storyreel_llm.writer import StoryboardWriter
from support import free_port

from storyreel.errors import Overloaded, UpstreamFailed

MESSAGES = [
    {"role": "system", "content": "You write storyboards."},
    {"role": "user", "content": 'Story idea: "a fox"'},
]
ZEPHYR = (
    '<|system|>\nYou write storyboards.</s>\n<|user|>\nStory idea: "a fox"</s>\n<|assistant|>\n'
)


@pytest.fixture
def tgi_settings(settings_for, tgi_double):
    return settings_for(backend="tgi", tgi_url=tgi_double.url, tgi_startup_poll_s=0.01)


def test_backend_setting_tgi_selects_the_tgi_backend(tgi_settings):
    assert isinstance(create_backend(tgi_settings), TGIBackend)


def test_json_request_carries_zephyr_prompt_grammar_budget_stops_and_seed(tgi_settings, tgi_double):
    tgi_double.answer('{"ok": true}')
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    text = TGIBackend(tgi_settings).generate_json(MESSAGES, schema, max_new_tokens=321, seed=42)

    assert text == '{"ok": true}'
    (request,) = tgi_double.requests
    assert request["path"] == "/"
    body = request["body"]
    assert body["inputs"] == ZEPHYR
    params = body["parameters"]
    assert params["grammar"] == {"type": "json", "value": schema}
    assert params["max_new_tokens"] == 321
    assert params["stop"] == ["</s>", "<|user|>"]
    assert params["seed"] == 42
    assert params["do_sample"] is True
    assert params["temperature"] == tgi_settings.temperature
    assert params["top_p"] == tgi_settings.top_p
    assert params["repetition_penalty"] == tgi_settings.repetition_penalty


def test_text_request_has_no_grammar(tgi_settings, tgi_double):
    tgi_double.answer("Once upon a time.")
    assert (
        TGIBackend(tgi_settings).generate_text(MESSAGES, 64, seed=2**64 + 5) == "Once upon a time."
    )
    params = tgi_double.requests[0]["body"]["parameters"]
    assert params.get("grammar") is None
    assert params["max_new_tokens"] == 64
    assert params["seed"] == 5  # kept within TGI's u64


def test_zephyr_format_is_used_when_no_chat_template_is_found(tgi_settings, tgi_double):
    backend = TGIBackend(tgi_settings)
    backend.load()  # /info names a model in no local cache
    assert backend.template_source == "zephyr"
    assert backend.prompt(MESSAGES) == zephyr_prompt(MESSAGES) == ZEPHYR


def test_chat_template_is_taken_from_the_models_tokenizer(settings_for, tgi_double, tmp_path):
    template = (
        "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>"})
    )
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, tgi_tokenizer=str(tmp_path))
    backend = TGIBackend(settings)
    backend.load()
    tgi_double.answer("ok")
    backend.generate_text(MESSAGES, 8, 1)
    assert backend.template_source == str(tmp_path)
    assert tgi_double.requests[0]["body"]["inputs"] == (
        '[SYSTEM] You write storyboards.</s>\n[USER] Story idea: "a fox"</s>\n[ASSISTANT] '
    )


def test_429_and_503_are_retried_until_the_server_answers(tgi_settings, tgi_double):
    tgi_double.error(429, "Model is overloaded", "overloaded")
    tgi_double.error(503, "Service unavailable", "unavailable")
    tgi_double.answer("fine")
    assert TGIBackend(tgi_settings).generate_text(MESSAGES, 8, 1) == "fine"
    assert len(tgi_double.requests) == 3


def test_a_dropped_connection_is_retried(tgi_settings, tgi_double):
    tgi_double.drop()
    tgi_double.answer("fine")
    assert TGIBackend(tgi_settings).generate_text(MESSAGES, 8, 1) == "fine"
    assert len(tgi_double.requests) == 2


def test_overload_that_outlasts_the_retries_raises_overloaded(settings_for, tgi_double):
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, retries=2)
    for _ in range(3):
        tgi_double.error(429, "Model is overloaded", "overloaded")
    with pytest.raises(Overloaded, match=f"TGI server at {tgi_double.url} is overloaded"):
        TGIBackend(settings).generate_text(MESSAGES, 8, 1)
    assert len(tgi_double.requests) == 3


def test_a_server_error_is_not_retried_and_names_the_url(tgi_settings, tgi_double):
    tgi_double.error(500, "CUDA out of memory", "generation")
    with pytest.raises(UpstreamFailed, match=f"TGI server at {tgi_double.url} failed"):
        TGIBackend(tgi_settings).generate_json(MESSAGES, {"type": "object"}, 8, 1)
    assert len(tgi_double.requests) == 1


def test_a_slow_answer_times_out_with_the_limit_in_the_message(settings_for, tgi_double):
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, request_timeout_s=0.3)
    tgi_double.slow(2.0, "late")
    with pytest.raises(UpstreamFailed, match=r"did not answer within 0\.3 s"):
        TGIBackend(settings).generate_text(MESSAGES, 8, 1)
    assert len(tgi_double.requests) == 1  # a timeout is not retried onto a slow server


def test_an_unreachable_server_gives_an_error_naming_the_endpoint(settings_for):
    port = free_port()  # nothing listens on it
    url = f"http://127.0.0.1:{port}"
    backend = TGIBackend(settings_for(backend="tgi", tgi_url=url, retries=1))
    with pytest.raises(UpstreamFailed, match=f"cannot reach TGI server at {url}"):
        backend.generate_json(MESSAGES, {"type": "object"}, max_new_tokens=8, seed=1)


def test_load_waits_until_tgi_health_answers_200(tgi_settings, tgi_double):
    tgi_double.health_statuses[:] = [503, 503]
    TGIBackend(tgi_settings).load()
    assert tgi_double.health_checks == 3


def test_load_gives_up_when_tgi_never_gets_ready(settings_for, tgi_double):
    tgi_double.health_statuses[:] = [503] * 1000
    settings = settings_for(
        backend="tgi", tgi_url=tgi_double.url, tgi_startup_timeout_s=0.05, tgi_startup_poll_s=0.01
    )
    with pytest.raises(UpstreamFailed, match=f"TGI server at {tgi_double.url} is not ready"):
        TGIBackend(settings).load()


def test_interrupt_ends_the_wait_for_tgi_at_once(settings_for, tgi_double):
    # The poll interval alone (30 s) outlasts interrupted_load's hang guard.
    settings = settings_for(
        backend="tgi", tgi_url=tgi_double.url, tgi_startup_timeout_s=600, tgi_startup_poll_s=30
    )
    failure = interrupted_load(TGIBackend(settings), tgi_double)
    assert isinstance(failure, UpstreamFailed) and "stopped while waiting" in str(failure)


# --- The writer over TGI -----------------------------------------------------------------------


def test_writer_over_tgi_sends_prose_then_the_cast_and_shot_grammars(tgi_settings, tgi_double):
    tgi_double.answer_all(answers_for(2))
    board = StoryboardWriter(TGIBackend(tgi_settings), tgi_settings).write("a whale", 2, "", 9)
    caps = tgi_settings.text_caps()
    grammars = [r["body"]["parameters"].get("grammar") for r in tgi_double.requests]
    assert grammars == [
        None,
        {"type": "json", "value": cast_schema(caps)},
        {"type": "json", "value": shot_schema(caps)},
        {"type": "json", "value": shot_schema(caps)},
    ]
    budgets = [r["body"]["parameters"]["max_new_tokens"] for r in tgi_double.requests]
    assert budgets == [
        tgi_settings.story_max_tokens(2),
        tgi_settings.cast_max_tokens,
        tgi_settings.shot_max_tokens,
        tgi_settings.shot_max_tokens,
    ]
    assert [c.name for c in board.characters] == [c["name"] for c in CAST["characters"]]
    assert len(board.scenes) == 2 and board.degraded is False
