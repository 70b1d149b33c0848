"""The OpenAI-compatible backend finds how a server constrains JSON instead of assuming it.

The double emulates kinds of servers: llama-cpp-python 0.3 (``json_schema`` is
HTTP 500 "Input should be 'text' or 'json_object'", ``json_object`` with a schema
and a GBNF ``grammar`` are held), vLLM (``json_schema``), a server that accepts
every format and ignores it, and servers that refuse everything.
"""

from __future__ import annotations

import functools
import json
import re

import grpc
import pytest
from llm.story_doubles import answers_for
from storyreel_llm.backends.openai import OpenAIBackend
from storyreel_llm.service import LlmService
from storyreel_llm.storyboard import cast_schema, shot_schema
from storyreel_llm.writer import StoryboardWriter
from support import health_status

from storyreel.errors import FailedPrecondition
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.serving import create_server

#: What llama-cpp-python 0.3.36's server answers to json_schema (seen against the real one).
# Imported where used, so that each test fails on its own where they are missing.
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"probe": {"type": "string", "enum": ["storyreel-probe"]}},
    "required": ["probe"],
    "additionalProperties": False,
}
LLAMA_CPP_PYTHON = {"json_schema": "refuse-500:Input should be 'text' or 'json_object'"}


@pytest.fixture
def settings(openai_settings_for):
    return functools.partial(openai_settings_for, tgi_startup_timeout_s=5)


def loaded(settings) -> OpenAIBackend:
    backend = OpenAIBackend(settings)
    backend.load()
    return backend


def test_auto_is_the_default_and_finds_json_object_on_llama_cpp_python(settings, openai_double):
    openai_double.emulate(**LLAMA_CPP_PYTHON)
    backend = loaded(settings())
    assert backend.response_format == "json_object"
    assert backend.capabilities["json_schema"].startswith("refused: HTTP 500: ")
    assert "json_object" in backend.capabilities["json_schema"]
    # The request the LLM service then sends carries the schema the llama.cpp way.
    openai_double.answer('{"ok": true}')
    backend.generate_json([{"role": "user", "content": "x"}], PROBE_SCHEMA, 8, 1)
    request = openai_double.story_requests[-1]["body"]
    assert request["response_format"] == {
        "type": "json_object",
        "schema": PROBE_SCHEMA,
        "value": PROBE_SCHEMA,
    }


def test_a_server_that_holds_json_schema_gets_json_schema(settings, openai_double):
    openai_double.emulate()
    assert loaded(settings()).response_format == "json_schema"


def test_a_format_accepted_but_ignored_is_not_taken_at_its_word(settings, openai_double):
    openai_double.emulate(json_schema="ignore", json_object="ignore", grammar="enforce")
    backend = loaded(settings())
    assert backend.response_format == "grammar"
    assert backend.capabilities == {
        "none": "works",
        "json_schema": "ignored",
        "json_object": "ignored",
        "grammar": "enforced",
    }
    from storyreel_llm.gbnf import schema_to_gbnf

    openai_double.answer('{"ok": true}')
    backend.generate_json([{"role": "user", "content": "x"}], shot_schema(_caps(settings)), 8, 1)
    body = openai_double.story_requests[-1]["body"]
    assert body["grammar"] == schema_to_gbnf(shot_schema(_caps(settings)))
    assert "response_format" not in body


def test_a_server_that_constrains_nothing_gets_the_tolerant_parser(settings, openai_double):
    openai_double.emulate(json_schema="refuse-400", json_object="ignore", grammar="refuse-422")
    backend = loaded(settings())
    assert backend.response_format == "none" and backend.constrains_json is False


def test_the_negotiation_is_done_once_and_logged(settings, openai_double, caplog):
    openai_double.emulate(**LLAMA_CPP_PYTHON)
    caplog.set_level("INFO", logger="storyreel_llm.backends.openai")
    backend = loaded(settings())
    probes = len(openai_double.requests)
    openai_double.answer_all(answers_for(1))
    StoryboardWriter(backend, settings()).write("a whale", 1, "", 5)
    assert len(openai_double.requests) == probes + 3  # story, cast, one shot: no more probes
    ready = [r for r in caplog.records if r.getMessage() == "openai server ready"]
    assert ready and ready[0].response_format == "json_object"


def test_a_named_format_the_server_refuses_fails_the_start_with_its_message(
    settings, openai_double
):
    openai_double.emulate(**LLAMA_CPP_PYTHON)
    with pytest.raises(FailedPrecondition, match="does not take response format 'json_schema'"):
        loaded(settings(openai_response_format="json_schema"))


def test_a_server_that_refuses_every_request_cannot_be_used(settings, openai_double):
    openai_double.emulate(plain="refuse-404")
    with pytest.raises(FailedPrecondition, match=r"cannot be used.*HTTP 404"):
        loaded(settings())


async def test_an_unusable_server_keeps_the_service_not_serving_and_says_why(
    settings, openai_double
):
    openai_double.emulate(plain="refuse-401")
    config = settings()
    running = await create_server(config, LlmService(config))
    address = f"127.0.0.1:{running.port}"
    try:
        with pytest.raises(FailedPrecondition):
            await running.service.load()
        assert await health_status(address) == "NOT_SERVING"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.WriteStoryboard(
                    llm_pb2.WriteStoryboardRequest(prompt="a fox", scene_count=1), timeout=30
                )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "HTTP 401" in caught.value.details()
    finally:
        await running.stop(0)


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_a_4xx_while_writing_is_a_configuration_error_never_unavailable(
    settings, openai_double, status
):
    openai_double.fail(status, {"error": {"message": "context length exceeded"}})
    backend = OpenAIBackend(settings(openai_response_format="json_object"))
    with pytest.raises(FailedPrecondition, match=f"HTTP {status}: context length exceeded"):
        backend.generate_text([{"role": "user", "content": "x"}], 8, 1)
    assert len(openai_double.requests) == 1  # not retried


def test_repetition_penalty_is_sent_under_both_names(settings, openai_double):
    openai_double.answer("A story.")
    backend = OpenAIBackend(settings(openai_response_format="none", repetition_penalty=1.3))
    backend.generate_text([{"role": "user", "content": "x"}], 8, 1)
    body = openai_double.requests[0]["body"]
    assert body["repetition_penalty"] == 1.3 and body["repeat_penalty"] == 1.3


def test_a_server_that_refuses_unknown_parameters_is_sent_no_penalty(settings, openai_double):
    openai_double.emulate(unknown_parameters="refuse")
    backend = loaded(settings())
    assert backend.response_format == "json_schema"
    openai_double.answer("A story.")
    backend.generate_text([{"role": "user", "content": "x"}], 8, 1)
    body = openai_double.story_requests[-1]["body"]
    assert "repetition_penalty" not in body and "repeat_penalty" not in body


def test_system_text_can_go_to_the_first_user_turn(settings, openai_double):
    """For chat formats that drop a system turn (llama-cpp-python's ``gemma``)."""
    openai_double.answer("A story.")
    backend = OpenAIBackend(settings(openai_response_format="none", openai_system_role=False))
    backend.generate_text(
        [{"role": "system", "content": "Rules."}, {"role": "user", "content": "Go."}], 8, 1
    )
    assert openai_double.requests[0]["body"]["messages"] == [
        {"role": "user", "content": "Rules.\n\nGo."}
    ]


def _caps(settings):
    return settings().text_caps()


# --- The schemas every grammar converter can hold to ---------------------------------------------


def _max_width(pattern: str) -> int:
    import re._parser as sre_parse

    return sre_parse.parse(pattern).getwidth()[1]


def _strings(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "string":
            yield schema
        for value in schema.values():
            yield from _strings(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _strings(value)


def test_every_text_field_is_bounded_by_its_pattern_alone(settings):
    """llama.cpp's converter keeps a pattern and drops maxLength: the pattern must stop."""
    caps = _caps(settings)
    for schema in (cast_schema(caps), shot_schema(caps)):
        for field in _strings(schema):
            if "enum" in field:
                continue
            assert "pattern" in field, field
            width = _max_width(field["pattern"])
            # Finite, and within a small multiple of the field's own cap.
            assert width <= 6 * field["maxLength"], (field["pattern"], width)
            assert not re.search(r"(?<!\\)[*+]|\{\d+,\}", field["pattern"]), field["pattern"]


def test_the_gbnf_grammar_of_each_schema_has_only_bounded_repetitions(settings):
    from storyreel_llm.gbnf import schema_to_gbnf

    caps = _caps(settings)
    for schema in (cast_schema(caps), shot_schema(caps)):
        grammar = schema_to_gbnf(schema)
        assert grammar.startswith("root ::= ")
        assert not re.search(r"[)\]\"][*+]", grammar), grammar
        keys = re.findall(r"\\x22(\w+)\\x22\\x3A", grammar)
        assert set(keys) >= set(schema["properties"])


def test_probe_answer_is_the_compact_probe_object():
    from storyreel_llm.backends.openai import PROBE_ANSWER

    assert json.loads(PROBE_ANSWER) == {"probe": "storyreel-probe"}
