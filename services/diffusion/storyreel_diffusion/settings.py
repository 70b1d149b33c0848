"""Settings of the render service (environment prefix ``STORYREEL_DIFFUSION_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.settings import ServiceSettings


class DiffusionSettings(ServiceSettings):
    """Model, device, request defaults and request limits of the render service."""

    model_config = SettingsConfigDict(env_prefix="STORYREEL_DIFFUSION_", extra="ignore")

    port: int = Field(default=50052, ge=0, le=65535)

    # A diffusers text-to-image checkpoint: a local folder (as `make models`
    # builds) or a model hub id (needs network access or a filled hub cache).
    model: str = Field(default="models/tiny-sd", min_length=1)
    # "auto" picks cuda when a GPU is visible, else cpu; any torch device name forces one.
    device: str = "auto"
    # "auto" is float16 on cuda and float32 elsewhere (CPU kernels are slow or missing in fp16).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Only read local files or the hub cache, never the network.
    local_files_only: bool = False

    # Used when a request leaves the field 0 or empty.
    default_width: int = Field(default=512, ge=8)
    default_height: int = Field(default=512, ge=8)
    default_steps: int = Field(default=25, ge=1)
    default_guidance: float = Field(default=7.5, gt=0)

    # Request limits; a request outside them is rejected before any work.
    max_scenes: int = Field(default=24, ge=1)
    min_side: int = Field(default=64, ge=8)
    max_side: int = Field(default=4096, ge=8)
    # Width and height must be multiples of this (the VAE's downsampling factor).
    side_multiple: int = Field(default=8, ge=1)
    max_steps: int = Field(default=150, ge=1)
    max_guidance: float = Field(default=30.0, gt=0)
    # Characters; the text encoder reads only the first 77 tokens anyway.
    max_prompt_chars: int = Field(default=2000, ge=1)

    # Render done at load time so health turns SERVING only after a render worked.
    warmup_side: int = Field(default=64, ge=8)
    warmup_steps: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> DiffusionSettings:
        """Refuse a configuration whose defaults its own limits would reject."""
        sides = {
            "default_width": self.default_width,
            "default_height": self.default_height,
            "warmup_side": self.warmup_side,
        }
        for name, value in sides.items():
            if not self.min_side <= value <= self.max_side or value % self.side_multiple:
                raise ValueError(
                    f"{name}={value} must be a multiple of {self.side_multiple} "
                    f"within {self.min_side}..{self.max_side}"
                )
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} exceeds max_steps")
        if self.default_guidance > self.max_guidance:
            raise ValueError(f"default_guidance={self.default_guidance} exceeds max_guidance")
        return self
