"""The OpenAI-compatible backend on the wire, against a test double (a real HTTP server).

vLLM, SGLang, llama.cpp, Ollama and TGI's Messages API cannot run here; the
double records each request so the exact payload is checked: messages,
response_format (both shapes), stop sequences, token limit, seed, key.
"""

from __future__ import annotations

import functools
import json

import pytest
from llm.story_doubles import CAST, STORY, answers_for, interrupted_load, shot
from storyreel_llm.backends import create_backend
from storyreel_llm.backends.openai import SCHEMA_NAME, OpenAIBackend, api_base
from storyreel_llm.storyboard import cast_schema, shot_schema
from storyreel_llm.writer import StoryboardWriter
from support import free_port

from storyreel.errors import FailedPrecondition, Overloaded, UpstreamFailed

MESSAGES = [
    {"role": "system", "content": "You write storyboards."},
    {"role": "user", "content": 'Story idea: "a fox"'},
]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture
def openai_for(openai_settings_for):
    # The wire tests name the format; the negotiation has tests of its own.
    return functools.partial(
        openai_settings_for, openai_model="zephyr-7b-beta", openai_response_format="json_schema"
    )


def test_backend_setting_openai_selects_the_openai_backend(openai_for):
    assert isinstance(create_backend(openai_for()), OpenAIBackend)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://h:8000", "http://h:8000/v1"),
        ("http://h:8000/v1/", "http://h:8000/v1"),
        ("http://h/api/v1", "http://h/api/v1"),
    ],
)
def test_the_api_base_always_ends_in_v1(url, base):
    assert api_base(url) == base


def test_json_schema_request_payload(openai_for, openai_double):
    settings = openai_for(openai_stop=["</s>"], openai_api_key="sk-test")
    openai_double.answer('{"ok": true}')
    text = OpenAIBackend(settings).generate_json(
        MESSAGES, SCHEMA, max_new_tokens=77, seed=2**40 + 3
    )

    assert text == '{"ok": true}'
    (request,) = openai_double.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test"
    assert request["body"] == {
        "model": "zephyr-7b-beta",
        "messages": MESSAGES,
        "max_tokens": 77,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": (2**40 + 3) % 2**31,
        "stream": False,
        # vLLM and TGI read the first name, llama.cpp's servers the second.
        "repetition_penalty": settings.repetition_penalty,
        "repeat_penalty": settings.repetition_penalty,
        "stop": ["</s>"],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": SCHEMA, "strict": True},
        },
    }


def test_json_object_variant_carries_the_schema_for_llama_cpp_and_tgi(openai_for, openai_double):
    openai_double.answer('{"ok": false}')
    OpenAIBackend(openai_for(openai_response_format="json_object")).generate_json(
        MESSAGES, SCHEMA, 16, 1
    )
    body = openai_double.requests[0]["body"]
    # llama.cpp reads "schema", TGI's Messages API reads "value"; each ignores the other.
    assert body["response_format"] == {"type": "json_object", "schema": SCHEMA, "value": SCHEMA}
    assert "stop" not in body and "authorization" not in openai_double.requests[0]["headers"]


def test_text_requests_and_servers_without_grammar_send_no_response_format(
    openai_for, openai_double
):
    openai_double.answer("A story.")
    openai_double.answer("Setting: a beach")
    plain = OpenAIBackend(openai_for(openai_response_format="none"))
    assert plain.constrains_json is False
    plain.generate_text(MESSAGES, 8, 1)
    plain.generate_json(MESSAGES, SCHEMA, 8, 1)
    assert all("response_format" not in r["body"] for r in openai_double.requests)


def test_429_with_retry_after_and_503_are_retried(openai_for, openai_double):
    openai_double.fail(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
    openai_double.fail(503, {"error": "loading"})
    openai_double.answer("fine")
    assert OpenAIBackend(openai_for()).generate_text(MESSAGES, 8, 1) == "fine"
    assert len(openai_double.requests) == 3


def test_a_dropped_connection_is_retried(openai_for, openai_double):
    openai_double.drop()
    openai_double.answer("fine")
    assert OpenAIBackend(openai_for()).generate_text(MESSAGES, 8, 1) == "fine"
    assert len(openai_double.requests) == 2


def test_overload_that_outlasts_the_retries_raises_overloaded(openai_for, openai_double):
    for _ in range(2):
        openai_double.fail(429, {"error": {"message": "rate limited"}})
    with pytest.raises(Overloaded, match="answered HTTP 429: rate limited"):
        OpenAIBackend(openai_for(retries=1)).generate_text(MESSAGES, 8, 1)


def test_a_bad_request_is_not_retried_and_quotes_the_server(openai_for, openai_double):
    openai_double.fail(400, {"error": {"message": "response_format is not supported"}})
    backend = OpenAIBackend(openai_for())
    with pytest.raises(
        FailedPrecondition, match="HTTP 400: response_format is not supported"
    ) as caught:
        backend.generate_json(MESSAGES, SCHEMA, 8, 1)
    assert backend.endpoint in caught.value.message
    assert len(openai_double.requests) == 1


def test_a_slow_answer_times_out_with_the_limit_in_the_message(openai_for, openai_double):
    openai_double.slow(2.0, openai_double.completion("late"))
    with pytest.raises(UpstreamFailed, match=r"did not answer within 0\.3 s"):
        OpenAIBackend(openai_for(request_timeout_s=0.3)).generate_text(MESSAGES, 8, 1)
    assert len(openai_double.requests) == 1


def test_an_unreachable_server_gives_an_error_naming_the_endpoint(settings_for):
    port = free_port()
    settings = settings_for(backend="openai", openai_url=f"http://127.0.0.1:{port}", retries=1)
    endpoint = f"http://127.0.0.1:{port}/v1/chat/completions"
    with pytest.raises(
        UpstreamFailed, match=f"cannot reach OpenAI-compatible server at {endpoint}"
    ):
        OpenAIBackend(settings).generate_text(MESSAGES, 8, 1)


def test_load_waits_for_v1_models_and_can_be_interrupted(openai_for, openai_double):
    # The poll interval alone (30 s) outlasts interrupted_load's hang guard.
    backend = OpenAIBackend(openai_for(tgi_startup_timeout_s=600, tgi_startup_poll_s=30))
    assert "stopped while waiting" in str(interrupted_load(backend, openai_double))


def test_writer_over_openai_sends_the_step_schemas(openai_for, openai_double):
    settings = openai_for()
    openai_double.answer_all(answers_for(1))
    board = StoryboardWriter(OpenAIBackend(settings), settings).write("a whale", 1, "photo", 5)
    formats = [r["body"].get("response_format") for r in openai_double.requests]
    caps = settings.text_caps()
    assert formats[0] is None
    assert formats[1]["json_schema"]["schema"] == cast_schema(caps)
    assert formats[2]["json_schema"]["schema"] == shot_schema(caps)
    assert len(board.scenes) == 1 and board.degraded is False


def test_writer_over_a_server_without_grammar_parses_chatty_answers(openai_for, openai_double):
    settings = openai_for(openai_response_format="none")
    openai_double.answer_all(
        [
            "Here is a short story:\n\n" + STORY + "\n\nI hope you like it!",
            "Sure! ```json\n" + json.dumps(CAST) + "\n```",
            "The shot:\n" + json.dumps(shot(["Moby"])).replace('"', "'"),
            "Characters: Ada\nSetting: by the lighthouse\nAction: Ada waves\nCamera: medium shot",
        ]
    )
    board = StoryboardWriter(OpenAIBackend(settings), settings).write("a whale", 2, "", 5)
    assert board.degraded is False
    assert board.scenes[0].characters[0] == "Moby"
    assert board.scenes[1].setting == "by the lighthouse"
    assert "I hope you like it" not in " ".join(s.narration for s in board.scenes)
