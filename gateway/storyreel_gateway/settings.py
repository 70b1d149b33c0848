"""Gateway settings (environment prefix ``STORYREEL_GATEWAY_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
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

    # Render calls one job's scenes are split over; 0 means one per render address.
    # Set it to the number of render replicas behind a dns:/// address.
    render_parallelism: int = Field(default=0, ge=0)
    # Transient upstream failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried with
    # exponential backoff until a stage has failed for this long.
    retry_initial_s: float = Field(default=0.5, gt=0)
    retry_max_backoff_s: float = Field(default=8.0, gt=0)
    retry_give_up_after_s: float = Field(default=300.0, ge=0)

    # Replicas sharing one artifact store (see storyreel_gateway.runner).
    # This process's name in job manifests; empty: host name, process id and a random suffix.
    # Set it to the pod name to have a restarted container take its jobs back at once;
    # it must be unique among the running replicas.
    instance_id: str = Field(default="", max_length=128)
    # A replica owns each job it runs for lease_s and renews the lease every lease_s / 3.
    # Every lease_s / 3 (spread by +-adopt_jitter of it) each replica adopts the unfinished
    # jobs whose lease lapsed, so a dead replica's jobs resume within about lease_s.
    lease_s: float = Field(default=30.0, gt=0)
    adopt_jitter: float = Field(default=0.25, ge=0, lt=1)
    # A claim (adopting or regenerating a job, taking an idempotency key) is read back after
    # this long; the replica whose write is read back won. Must exceed one store write.
    claim_confirm_s: float = Field(default=0.25, ge=0)
    # How often a replica looks for cancel requests made on other replicas for its jobs.
    cancel_poll_s: float = Field(default=1.0, gt=0)
    # CancelJob of a job running on another replica waits this long for it to end.
    cancel_wait_s: float = Field(default=10.0, ge=0)
    # WatchJob of a job running on another replica reads its manifest this often.
    watch_poll_s: float = Field(default=0.5, gt=0)

    # ListJobs page size when the request leaves it 0, and the largest allowed.
    default_page_size: int = Field(default=20, ge=1)
    max_page_size: int = Field(default=100, ge=1)
    max_idempotency_key_chars: int = 128
    max_voice_chars: int = 64

    # API keys: tenant name -> its bearer tokens, as JSON, e.g. {"acme": ["k1", "k2"]}.
    # Empty (with no api_keys_file) is the single-machine default: no authentication,
    # and the gateway refuses to listen anywhere but on a loopback address.
    api_keys: dict[str, list[SecretStr]] = Field(default_factory=dict)
    # The same mapping in a JSON file (a mounted Secret); merged with api_keys.
    api_keys_file: Path | None = None
    # TLS on the public port: PEM certificate chain and private key. Both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def lease_renew_s(self) -> float:
        """How often leases are renewed and orphaned jobs looked for."""
        return self.lease_s / 3

    def tenant_keys(self) -> dict[str, list[str]]:
        """Every configured tenant with its keys (from api_keys and api_keys_file)."""
        import json

        keys = {
            tenant: [k.get_secret_value() for k in values]
            for tenant, values in self.api_keys.items()
        }
        if self.api_keys_file:
            loaded = json.loads(self.api_keys_file.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{self.api_keys_file} must hold a JSON object of tenant -> keys")
            for tenant, values in loaded.items():
                values = [values] if isinstance(values, str) else list(values)
                keys.setdefault(tenant, []).extend(str(v) for v in values)
        return keys

    @model_validator(mode="after")
    def _safe_defaults(self) -> GatewaySettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if not self.api_keys and not self.api_keys_file and not _is_loopback(self.host):
            raise ValueError(
                f"the gateway has no API keys configured, so it listens only on a loopback "
                f"address; host={self.host!r} needs STORYREEL_GATEWAY_API_KEYS or "
                "STORYREEL_GATEWAY_API_KEYS_FILE"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
