"""Every conversation the writer sends renders with the chat templates of six model families.

The templates are the families' own (see chat_templates/make_fixtures.py), rendered
by transformers' ``apply_chat_template`` on small local tokenizers. Strict ones
(Gemma, Mistral) refuse two user turns in a row, which a re-ask used to send after
a cut-off or non-JSON answer; Mistral's and Gemma 2's refuse a system turn, whose
text then goes to the first user turn.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from llm.story_doubles import CAST, STORY, ScriptedBackend, shot
from storyreel_llm.writer import StoryboardWriter

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
FAMILIES = ["zephyr", "llama3", "mistral", "gemma2", "gemma3", "smollm2"]
#: Families whose templates take a system turn as it is.
TAKES_SYSTEM = {"zephyr", "llama3", "gemma3", "smollm2"}


@pytest.fixture(scope="module")
def conversations(settings_for) -> list[list[dict[str, str]]]:
    """Every conversation the writer sends in the runs that exercise each kind of re-ask."""
    settings = settings_for(repair_attempts=2)
    cast = json.dumps(CAST)
    scripts = {
        "clean": (1, [STORY, cast, json.dumps(shot())]),
        # The story is too short and is continued; the cast comes back cut off, then not as
        # JSON; a shot names somebody unknown, then is cut off.
        "re-asks": (
            2,
            [
                "Ada kept the lighthouse.",
                "She saw a whale. She sang to it.",
                cast[:50],
                "I think the title is The Keeper",
                cast,
                json.dumps(shot(["Zed"])),
                json.dumps(shot())[:30],
                json.dumps(shot()),
                json.dumps(shot()),
            ],
        ),
        # Every cast answer is empty.
        "empty": (1, [STORY, "", "", "", json.dumps(shot())]),
    }
    sent: list[list[dict[str, str]]] = []
    for name, (scenes, answers) in scripts.items():
        backend = ScriptedBackend(answers, constrains_json=name != "re-asks")
        try:
            StoryboardWriter(backend, settings).write("a whale story", scenes, "", seed=3)
        except Exception as exc:  # the conversations sent so far are still checked
            FAILED_RUNS.append(f"{name}: {exc!r}")
        sent += [call.messages for call in backend.calls]
    return sent


FAILED_RUNS: list[str] = []


def test_the_writer_sends_alternating_turns_with_every_kind_of_re_ask(conversations):
    assert not FAILED_RUNS
    re_asks = [c for c in conversations if len(c) > 4]
    assert len(re_asks) >= 4  # continue, cut-off cast, non-JSON cast, bad shot...
    for messages in conversations:
        roles = [m["role"] for m in messages]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns[0] == "user" and turns[-1] == "user", roles
        assert all(a != b for a, b in itertools.pairwise(turns)), roles
        assert "system" not in turns, roles


@pytest.mark.parametrize("family", FAMILIES)
def test_every_conversation_renders_with_the_familys_own_template(family, conversations):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEMPLATES / family)
    for messages in conversations:
        turns = messages
        if family not in TAKES_SYSTEM:
            from storyreel_llm.backends.base import fold_system

            turns = fold_system(messages)
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        for message in messages:
            assert message["content"].strip() in text  # nothing dropped, the system text too


@pytest.mark.parametrize("family", FAMILIES)
def test_the_template_inspection_finds_the_system_role_and_the_turn_end(family):
    from storyreel_llm.backends.chat import inspect_chat_template, tokenizer_render
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEMPLATES / family)
    found = inspect_chat_template(tokenizer_render(tokenizer))
    assert found.takes_system is (family in TAKES_SYSTEM)
    expected_end = {
        "zephyr": "</s>",
        "llama3": "<|eot_id|>",
        "mistral": "</s>",
        "gemma2": "<end_of_turn>",
        "gemma3": "<end_of_turn>",
        "smollm2": "<|im_end|>",
    }[family]
    assert found.turn_end.strip() == expected_end
    rendered = found.render(
        [{"role": "system", "content": "Rules."}, {"role": "user", "content": "Hi."}]
    )
    assert "Rules." in rendered and "Hi." in rendered


def test_the_smollm2_fixture_carries_the_shipped_template():
    shipped = Path("models/smollm2-135m-instruct/chat_template.jinja")
    if not shipped.is_file():
        pytest.skip("models/ not built (make models)")
    assert (TEMPLATES / "smollm2" / "chat_template.jinja").read_text() == shipped.read_text()
