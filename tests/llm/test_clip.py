"""CLIP token budget: the real CLIP tokenizer, and image prompts that fit 77 tokens whole."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest

from storyreel import clip_vocab
from storyreel.clip_count import clip_tokenizer
from storyreel.image_prompts import PromptTooLong, assemble_image_prompt

STYLE = "children's storybook illustration, warm colors, gentle shapes"
LOOKS = [
    "a young woman with red hair, a yellow raincoat and green rubber boots",
    "a huge blue whale with a white scar across its left fin",
    "an old grey cat with one torn ear and a bright red collar",
]
ACTION = "Ada rows a small wooden boat through the huge stormy waves toward the whale"
SETTING = "on a dark stormy sea at dawn near the old white lighthouse on the cliff"


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer on the same vocabulary files, for comparison."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    clip_vocab.write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=clip_vocab.MAX_TOKENS)


@pytest.mark.parametrize(
    "text",
    [
        STYLE,
        "Hello  WORLD!!  it's 3.14 dragons' ÉLAN naïve café",
        "rowing-boat, 35mm, f/1.8, 4k <|endoftext|>",
        "😀 emoji and 日本語 text",
        "",
    ],
    ids=["style", "case-punctuation-accents", "numbers-special-token", "emoji-cjk", "empty"],
)
def test_token_ids_match_transformers_clip_tokenizer(tokenizer, reference, text):
    assert tokenizer.ids(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.count(text) == len(reference(text)["input_ids"])


def test_counts_include_the_start_and_end_tokens(tokenizer):
    assert tokenizer.count("") == 2
    assert tokenizer.count("a cat") == 4


def test_a_prompt_that_fits_is_kept_whole_in_its_order(tokenizer):
    fitted = assemble_image_prompt(
        style="watercolor",
        appearances=[LOOKS[0]],
        action="Ada waves",
        setting="on a beach",
        camera="close-up",
        tokenizer=tokenizer,
    )
    assert fitted.text == f"watercolor, close-up, {LOOKS[0]}, Ada waves, on a beach"
    assert fitted.shortened == ()
    assert fitted.tokens == tokenizer.count(fitted.text)


def test_shortening_drops_camera_then_style_tail_then_cuts_the_setting(tokenizer):
    fitted = assemble_image_prompt(
        style=STYLE,
        appearances=LOOKS,
        action=ACTION,
        setting=SETTING,
        camera="wide shot",
        tokenizer=tokenizer,
    )
    assert fitted.tokens <= 77
    assert fitted.shortened == ("camera dropped", "style shortened", "setting shortened")
    assert "wide shot" not in fitted.text
    assert fitted.text.startswith("children's storybook illustration, a young woman")
    assert ACTION in fitted.text
    for look in LOOKS:
        assert look in fitted.text


def test_the_action_is_cut_only_after_the_setting_is_gone(tokenizer):
    long_action = (
        ACTION + " while gulls circle above and cold rain falls on the grey rocks of the bay"
    )
    fitted = assemble_image_prompt(
        style=STYLE, appearances=LOOKS, action=long_action, setting=SETTING, tokenizer=tokenizer
    )
    assert fitted.tokens <= 77
    assert "setting dropped" in fitted.shortened
    assert fitted.shortened.index("setting dropped") < fitted.shortened.index("action shortened")
    for look in LOOKS:
        assert look in fitted.text


def test_appearances_that_alone_overflow_are_refused_not_cut(tokenizer):
    huge = ", ".join(LOOKS * 3)
    with pytest.raises(PromptTooLong, match="appearances alone"):
        assemble_image_prompt(style=STYLE, appearances=[huge], action=ACTION, tokenizer=tokenizer)


def test_every_assembled_prompt_fits_and_keeps_each_appearance_intact(tokenizer, settings_for):
    """Many combinations of long and short parts, up to three characters at the cap."""
    settings = settings_for()
    rng = random.Random(7)
    words = (SETTING + " " + ACTION + " " + STYLE).replace(",", "").split()
    looks = [look for look in LOOKS if tokenizer.count(look) <= settings.max_appearance_clip_tokens]
    assert len(looks) == 3
    for count, _ in itertools.product(range(4), range(25)):
        present = rng.sample(looks, count)
        parts = {
            key: " ".join(rng.choices(words, k=rng.randint(0, 30)))
            for key in ("style", "action", "setting")
        }
        fitted = assemble_image_prompt(
            appearances=present,
            camera=rng.choice(["", "wide shot", "close-up"]),
            max_tokens=settings.clip_max_tokens,
            tokenizer=tokenizer,
            **parts,
        )
        assert fitted.tokens == tokenizer.count(fitted.text) <= settings.clip_max_tokens
        for look in present:
            assert look in fitted.text


def test_settings_refuse_appearance_caps_that_cannot_fit_together(settings_for):
    with pytest.raises(ValueError, match="does not fit"):
        settings_for(max_characters_per_scene=4, max_appearance_clip_tokens=20)


def test_the_tokenizer_needs_no_torch_or_transformers():
    code = (
        "import sys\n"
        "from storyreel.clip_count import clip_tokenizer\n"
        "assert clip_tokenizer().count('a red fox') == 5\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
