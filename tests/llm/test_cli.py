"""`storyreel parse-storyboard` and `storyreel storyboard`, run as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llm.story_doubles import CAST, answers_for
from storyreel_llm.service import LlmService
from support import free_port

from storyreel.serving import start_and_load

STORYREEL = [sys.executable, "-m", "storyreel.cli"]
CORPUS = Path(__file__).parent / "corpus"


def parse(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STORYREEL, "parse-storyboard", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_parse_storyboard_prints_the_storyboard_as_json():
    raw = (CORPUS / "02-json-fenced-with-prose.txt").read_text()
    result = parse(raw)
    assert result.returncode == 0, result.stderr
    board = json.loads(result.stdout)
    assert board["title"] == "The Keeper and the Whale"
    assert board["characters"][0] == {
        "name": "Ada",
        "appearance": "a lighthouse keeper in a red coat",
    }
    assert [s["index"] for s in board["scenes"]] == [1, 2]
    assert board["scenes"][0]["image_prompt"] == "a whale stranded in a bay at dawn"
    assert board["degraded"] is False


def test_parse_storyboard_reads_the_classic_chat_answer_as_one_scene_per_image_prompt():
    raw = (CORPUS / "chat" / "llama3-script-then-image-prompts.txt").read_text()
    result = parse(raw)
    assert result.returncode == 0, result.stderr
    board = json.loads(result.stdout)
    assert board["title"] == "The Lighthouse Fox"
    assert [s["image_prompt"] for s in board["scenes"]] == [
        "a small red fox beside a white lighthouse at dusk, watercolor",
        "a dark lighthouse in a raging storm, waves on black rocks",
        "a fox next to a glowing lamp at the top of a lighthouse, ships far away",
    ]
    assert board["scenes"][2]["narration"] == "Ships passed safely home."
    assert board["degraded"] is False


@pytest.mark.parametrize(
    ("stdin", "args", "reason"),
    [
        ("", (), "the answer is empty"),
        ("I'm sorry, but I can't help with that.", (), "the model refused"),
        ("Ada sailed. A whale sang. The sea was calm.", (), "the answer holds no image prompt"),
        (
            "I'm ready to answer your question about the content I've scraped. "
            "What would you like to know?",
            (),
            "the answer holds no image prompt",
        ),
        (
            "Scene 1: Ada sang.\nImage prompt: a woman singing",
            ("--scenes", "3"),
            "the answer has 1 complete scene(s) where 3 were asked",
        ),
    ],
    ids=["empty", "refusal", "story-without-prompts", "chatter", "too-few-scenes"],
)
def test_parse_storyboard_exits_1_and_says_why_when_nothing_is_usable(stdin, args, reason):
    result = parse(stdin, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no usable storyboard" in result.stderr and reason in result.stderr


def test_parse_storyboard_refuses_a_scene_count_outside_1_to_24():
    result = parse("Ada sang.", "--scenes", "25")
    assert result.returncode == 2
    assert "scene count must be between 1 and 24 (got 25)" in result.stderr


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in a subprocess, awaited so this event loop keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        *STORYREEL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def story_service(settings_for, tgi_double):
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url)
    running = await start_and_load(settings, LlmService(settings))
    yield f"127.0.0.1:{running.port}"
    await running.stop(0)


async def test_storyboard_asks_the_story_service_and_prints_it(story_service, tgi_double):
    tgi_double.answer_all(answers_for(2))
    code, out, err = await run_cli(
        "storyboard",
        "a whale story",
        "--scenes",
        "2",
        "--style",
        "anime",
        "--address",
        story_service,
    )
    assert code == 0, err
    assert out.startswith(f"{CAST['title']}\n{CAST['logline']}\n")
    assert "  Ada: a young woman with red hair and a yellow raincoat" in out
    assert "Scene 2 (Ada)" in out
    assert "image prompt: anime illustration" in out


async def test_storyboard_json_has_the_storyboard_fields(story_service, tgi_double):
    tgi_double.answer_all(answers_for(1))
    code, out, err = await run_cli(
        "storyboard", "a whale story", "--scenes", "1", "--json", "--address", story_service
    )
    assert code == 0, err
    board = json.loads(out)
    assert set(board) >= {"title", "logline", "characters", "scenes", "style", "degraded"}
    assert board["scenes"][0]["index"] == 1
    assert board["scenes"][0]["setting"] == "on a rocky beach at dawn"
    assert board["style"] == "storybook"


async def test_storyboard_refused_request_exits_2(story_service, tgi_double):
    code, _, err = await run_cli("storyboard", "x" * 2001, "--address", story_service)
    assert code == 2
    assert "prompt must be at most 2000 characters (got 2001)" in err
    assert tgi_double.requests == []


async def test_storyboard_unreachable_service_exits_3():
    address = f"127.0.0.1:{free_port()}"
    code, _, err = await run_cli("storyboard", "a fox", "--address", address, "--timeout", "5")
    assert code == 3
    assert f"LLM service at {address} unreachable" in err


async def test_storyboard_local_runs_the_writer_in_process(tgi_double):
    """--local needs no LLM service; here its backend is the TGI double (no model load)."""
    tgi_double.answer_all(answers_for(1))
    env = {"STORYREEL_LLM_BACKEND": "tgi", "STORYREEL_LLM_TGI_URL": tgi_double.url}
    code, out, err = await run_cli(
        "storyboard", "a whale", "--scenes", "1", "--local", "--json", env=env
    )
    assert code == 0, err
    assert json.loads(out)["title"] == CAST["title"]
    assert len(tgi_double.requests) == 3


async def test_storyboard_local_refuses_a_bad_request_before_loading(tgi_double):
    env = {"STORYREEL_LLM_BACKEND": "tgi", "STORYREEL_LLM_TGI_URL": tgi_double.url}
    code, _, err = await run_cli("storyboard", "   ", "--local", env=env)
    assert code == 2
    assert "prompt must not be empty" in err
    assert tgi_double.health_checks == 0
