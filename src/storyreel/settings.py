"""Settings shared by every service.

Each service subclasses :class:`ServiceSettings` with its own environment
prefix (``STORYREEL_LLM_``, ``STORYREEL_DIFFUSION_``, ...). Storage is
configured once for the whole deployment with the ``STORYREEL_STORAGE_``
prefix, so every service reads and writes the same artifacts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageSettings(BaseSettings):
    """Where artifacts (images, audio, video, manifests) live."""

    model_config = SettingsConfigDict(env_prefix="STORYREEL_STORAGE_", extra="ignore")

    # file:///absolute/dir for one machine, s3://bucket[/prefix] for MinIO or any S3 server.
    url: str = Field(default_factory=lambda: (Path.cwd() / "data" / "artifacts").as_uri())
    # host:port of the S3 endpoint, used with s3:// URLs.
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_secure: bool = False
    s3_region: str | None = None
    # host:port callers outside the cluster use to reach S3, for presigned URLs (the
    # signature covers the host). Empty: the same as s3_endpoint.
    s3_public_endpoint: str = ""
    s3_public_secure: bool | None = None
    # Lifetime of presigned download URLs handed to callers.
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has. Subclasses set their own env prefix."""

    model_config = SettingsConfigDict(env_prefix="STORYREEL_", extra="ignore")

    host: str = "127.0.0.1"
    # 0 binds a free port; the bound port is logged and written to port_file.
    port: int = Field(default=0, ge=0, le=65535)
    # When set, the bound port is written here once the server listens.
    port_file: Path | None = None
    log_level: str = "INFO"
    # Seconds in-flight RPCs get to finish after SIGTERM.
    grace_period_s: float = Field(default=10.0, ge=0)
    # Largest message accepted or sent, in bytes.
    max_message_bytes: int = 4 * 1024 * 1024
    # Clients are asked to reconnect after this long (calls in flight finish first), so
    # that clients balancing over a DNS name spread onto replicas added since.
    max_connection_age_s: float = Field(default=300.0, gt=0)
