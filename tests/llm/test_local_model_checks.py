"""The in-process backend checks a model when it loads, and refuses one that cannot serve.

Tiny random-weight Llama models (built from a config here, as diffusers' tests do)
carry the tokenizers of tests/llm/chat_templates: a model without a chat template
used to load and then die at the first request with a raw ValueError; Gemma's
``<end_of_turn>`` and Llama 3's ``<|eot_id|>`` were no stop tokens when the
model's configuration did not list them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from llm.story_doubles import tiny_llama
from storyreel_llm.backends.local import LocalBackend

from storyreel.errors import FailedPrecondition

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"


def tiny_model(folder: Path, family: str, template: str | None = "keep") -> Path:
    """A random 1-layer Llama in ``folder`` with ``family``'s tokenizer (and template)."""
    import torch
    from transformers import AutoTokenizer

    shutil.copytree(TEMPLATES / family, folder)
    if template != "keep":
        (folder / "chat_template.jinja").unlink()
        if template is not None:
            (folder / "chat_template.jinja").write_text(template)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    tiny_llama(
        len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(folder)
    return folder


def backend_for(settings_for, folder: Path, **overrides) -> LocalBackend:
    return LocalBackend(settings_for(model=str(folder), **overrides))


def test_a_model_without_a_chat_template_is_refused_at_load_saying_why(settings_for, tmp_path):
    folder = tiny_model(tmp_path / "base", "zephyr", template=None)
    backend = backend_for(settings_for, folder)
    with pytest.raises(FailedPrecondition, match=r"no chat template.*not an instruct"):
        backend.load()
    assert not backend.loaded


@pytest.mark.parametrize(
    ("family", "turn_end"), [("gemma3", "<end_of_turn>"), ("llama3", "<|eot_id|>")]
)
def test_the_templates_turn_end_becomes_a_stop_token(settings_for, tmp_path, family, turn_end):
    """Gemma's and Llama 3's configurations stop at <eos> / <|end_of_text|> only."""
    folder = tiny_model(tmp_path / family, family)
    backend = backend_for(settings_for, folder, check_instruct_model=False)
    backend.load()
    assert turn_end in backend.stop_tokens
    assert backend.tokenizer.eos_token in backend.stop_tokens


def test_a_template_without_a_system_role_gets_the_system_text_in_the_user_turn(
    settings_for, tmp_path
):
    folder = tiny_model(tmp_path / "gemma2", "gemma2")
    backend = backend_for(settings_for, folder, check_instruct_model=False)
    backend.load()
    assert backend.chat_format is not None and backend.chat_format.takes_system is False
    messages = [
        {"role": "system", "content": "You write stories."},
        {"role": "user", "content": "A fox."},
    ]
    assert "You write stories.\n\nA fox." in backend.chat_format.render(messages)
    backend.generate_text(messages, 4, seed=1)  # renders and runs: no "System role" error


def test_a_template_whose_turns_end_in_plain_text_is_refused(settings_for, tmp_path):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} END OF TURN\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    folder = tiny_model(tmp_path / "plain", "zephyr", template=template)
    with pytest.raises(FailedPrecondition, match="no special token"):
        backend_for(settings_for, folder, check_instruct_model=False).load()


def test_a_model_that_never_ends_its_turn_is_refused_as_no_instruct_model(settings_for, tmp_path):
    """Random weights end a turn no more often than any other token: as a base model."""
    folder = tiny_model(tmp_path / "random", "smollm2")
    with pytest.raises(FailedPrecondition, match="not an instruct model"):
        backend_for(settings_for, folder).load()


@pytest.mark.model
def test_smollm2_passes_the_checks_with_chatml(smollm2):
    assert smollm2.stop_tokens == ("<|im_end|>",)
    assert smollm2.chat_format.takes_system is True
