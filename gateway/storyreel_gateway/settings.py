"""Gateway settings (environment prefix ``STORYREEL_GATEWAY_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from storyreel.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STORYREEL_GATEWAY_", extra="ignore")

    port: int = Field(default=50050, ge=0, le=65535)

    # Upstream services: host:port, or dns:///name:port to balance over every replica.
    story_address: str = "127.0.0.1:50051"
    render_address: str = "127.0.0.1:50052"
    compose_address: str = "127.0.0.1:50053"

    # Deadlines of each upstream call, in seconds.
    storyboard_timeout_s: float = Field(default=600.0, gt=0)
    render_timeout_s: float = Field(default=1800.0, gt=0)
    compose_timeout_s: float = Field(default=1800.0, gt=0)

    # Request limits and defaults.
    max_prompt_chars: int = 2000
    max_style_chars: int = 200
    min_scenes: int = 1
    max_scenes: int = 24
    default_scenes: int = 4
    # Video size and frame rate when the request leaves them at 0.
    video_width: int = Field(default=1280, ge=64, le=3840)
    video_height: int = Field(default=720, ge=64, le=3840)
    video_fps: int = Field(default=24, ge=1, le=60)
    max_video_side: int = 3840
    # Render settings passed to the render service (0 keeps its defaults).
    render_width: int = Field(default=0, ge=0)
    render_height: int = Field(default=0, ge=0)
    render_steps: int = Field(default=0, ge=0)
    render_guidance: float = Field(default=0.0, ge=0)

    # Jobs that run at once; the rest wait in the admission queue.
    max_jobs_in_flight: int = Field(default=4, ge=1)
    # Jobs that may wait; beyond this CreateVideo answers RESOURCE_EXHAUSTED.
    max_jobs_queued: int = Field(default=64, ge=0)

    # Audio uploads: largest accepted file, in bytes.
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
