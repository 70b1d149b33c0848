"""Gateway settings (environment prefix ``STORYREEL_GATEWAY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.limits import MAX_SCENES, MIN_SCENES
from storyreel.retries import RetryPolicy
from storyreel.settings import ServiceSettings, is_loopback_host, secret_setting
from storyreel_gateway.auth import check_tenant_keys

#: With web_port unset, the web port is the gRPC port plus this (50050 -> 50054): the port
#: after the llm, diffusion and composer services' under `storyreel serve`.
WEB_PORT_OFFSET = 4


class GatewaySettings(ServiceSettings):
    # hide_input_in_errors: a wrong value of api_keys must not print the keys it holds.
    model_config = SettingsConfigDict(
        env_prefix="STORYREEL_GATEWAY_", extra="ignore", hide_input_in_errors=True
    )

    port: int = Field(default=50050, ge=0, le=65535)
    # The web port (storyreel_gateway.web): the studio page and the public API for browsers
    # (gRPC-Web, forwarded to the gRPC port's own servicer). Unset: port + WEB_PORT_OFFSET
    # (50054) when the gRPC port is fixed, off when it is 0; 0 binds a free one; -1 is off.
    web_port: int | None = Field(default=None, ge=-1, le=65535)
    # Its address; empty: the same as host.
    web_host: str = ""
    # When set, the bound web port is written here (before port_file), or nothing when off.
    web_port_file: Path | None = None

    # Upstream services: host:port, or dns:///name:port to balance over every replica.
    llm_address: str = "127.0.0.1:50051"
    diffusion_address: str = "127.0.0.1:50052"
    composer_address: str = "127.0.0.1:50053"

    # Deadlines of each upstream call, in seconds.
    storyboard_timeout_s: float = Field(default=600.0, gt=0)
    render_timeout_s: float = Field(default=1800.0, gt=0)
    compose_timeout_s: float = Field(default=1800.0, gt=0)

    # Request limits and defaults.
    max_prompt_chars: int = 2000
    max_style_chars: int = 200
    # Scene counts: within the shared bounds (storyreel.limits); a deployment may narrow them.
    min_scenes: int = Field(default=MIN_SCENES, ge=MIN_SCENES, le=MAX_SCENES)
    max_scenes: int = Field(default=MAX_SCENES, ge=MIN_SCENES, le=MAX_SCENES)
    default_scenes: int = Field(default=4, ge=MIN_SCENES, le=MAX_SCENES)
    # Video size and frame rate when the request leaves them at 0.
    video_width: int = Field(default=1280, ge=64, le=3840)
    video_height: int = Field(default=720, ge=64, le=3840)
    video_fps: int = Field(default=24, ge=1, le=60)
    max_video_side: int = 3840
    # Render settings passed to the diffusion service (0 keeps its defaults).
    render_width: int = Field(default=0, ge=0)
    render_height: int = Field(default=0, ge=0)
    render_steps: int = Field(default=0, ge=0)
    render_guidance: float = Field(default=0.0, ge=0)

    # Job state: a SQLAlchemy URL. Empty: SQLite in data/gateway.db under the working
    # directory (one machine). Several replicas need PostgreSQL, e.g.
    # postgresql+asyncpg://user:password@host:5432/storyreel (postgresql:// works too).
    database_url: str = ""
    # The same URL in a file (a mounted Secret: it holds the password), whitespace around
    # it stripped. An alternative to database_url: setting both is an error.
    database_url_file: Path | None = None
    # Connections each replica keeps open to PostgreSQL (and as many more at peaks).
    database_pool_size: int = Field(default=10, ge=1)
    # Jobs this replica runs at once; the rest wait in the shared queue.
    max_jobs_in_flight: int = Field(default=4, ge=1)
    # Jobs that may wait, over all replicas; beyond this CreateVideo answers
    # RESOURCE_EXHAUSTED.
    max_jobs_queued: int = Field(default=64, ge=0)
    # Per tenant: jobs that may wait, and that may run at once over all replicas
    # (0: no limit of its own). Queued jobs start fairly: the tenant with the fewest
    # jobs running goes first.
    max_jobs_queued_per_tenant: int = Field(default=16, ge=0)
    max_jobs_running_per_tenant: int = Field(default=0, ge=0)

    # Audio uploads: largest accepted file, in bytes.
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    # Per tenant: bytes of uploads kept (in progress and stored), and uploads at once.
    max_upload_bytes_per_tenant: int = Field(default=1024 * 1024 * 1024, ge=0)
    max_uploads_per_tenant: int = Field(default=2, ge=0)
    # An upload stream that sends nothing for this long is cut off.
    upload_idle_timeout_s: float = Field(default=30.0, gt=0)
    # An upload that no job used is deleted after this long.
    upload_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    # Where uploads are spooled while received; what a dead process left is removed at start.
    upload_tmp_dir: Path | None = None
    # Image uploads (characters' reference images): largest accepted file, in bytes, and
    # most pixels (width x height, read from the header before anything is decoded).
    max_image_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)

    # A copy of each finished job as jobs/<id>/manifest.json beside its artifacts (an
    # export for people and tools; the gateway never reads it).
    export_manifests: bool = True

    # Render calls one job's scenes are split over; 0 means one per render address.
    # Set it to the number of render replicas behind a dns:/// address.
    render_parallelism: int = Field(default=0, ge=0)
    # Transient upstream failures (UNAVAILABLE, RESOURCE_EXHAUSTED, UNAUTHENTICATED) are
    # retried with exponential backoff until a stage has failed for this long. The one
    # place calls to the services are retried (see retry_policy and storyreel.retries).
    retry_initial_s: float = Field(default=0.5, gt=0)
    retry_max_backoff_s: float = Field(default=8.0, gt=0)
    retry_give_up_after_s: float = Field(default=300.0, ge=0)

    # Replicas sharing one database (see gateway/README.md).
    # This process's name in the database; empty: host name, process id and a random
    # suffix. Set it to the pod name to have a restarted container take its jobs back at
    # once; it must be unique among the running replicas.
    instance_id: str = Field(default="", max_length=128)
    # A replica's claim on each job it runs lasts lease_s (database clock) and is renewed
    # every lease_s / 3; a dead replica's jobs are adopted once their claims lapse.
    lease_s: float = Field(default=30.0, gt=0)
    # How often a replica with a free slot looks for a job to run (queued, handed back or
    # orphaned), spread by +-claim_jitter of it. Own writes and, on PostgreSQL, other
    # replicas' notifications wake it sooner.
    claim_poll_s: float = Field(default=1.0, gt=0)
    claim_jitter: float = Field(default=0.25, ge=0, lt=1)
    # How often the owner of a job looks for a cancel asked on another replica (on
    # PostgreSQL a notification usually wakes it first).
    cancel_poll_s: float = Field(default=0.25, gt=0)
    # CancelJob of a job running on another replica waits this long for it to end.
    cancel_wait_s: float = Field(default=10.0, ge=0)
    # WatchJob looks for new events this often when nothing woke it sooner.
    watch_poll_s: float = Field(default=0.5, gt=0)

    # ListJobs page size when the request leaves it 0, and the largest allowed.
    default_page_size: int = Field(default=20, ge=1)
    max_page_size: int = Field(default=100, ge=1)
    max_idempotency_key_chars: int = 128
    max_voice_chars: int = 64

    # API keys: tenant name -> its bearer tokens, as JSON, e.g. {"acme": ["k1", "k2"]}.
    # A key may be given as its SHA-256 digest, "sha256:<64 hex digits>" (printf %s KEY |
    # sha256sum), so the configuration need not hold the key itself. Every tenant needs at
    # least one non-empty key. No key at all (here or in api_keys_file) is the
    # single-machine default: no authentication, and the gateway refuses to listen
    # anywhere but on a loopback address. Errors about keys never print a key.
    api_keys: dict[str, list[SecretStr]] = Field(default_factory=dict)
    # The same mapping in a JSON file (a mounted Secret); merged with api_keys.
    api_keys_file: Path | None = None
    # TLS on the public port: PEM certificate chain and private key. Both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def web_bind(self) -> tuple[str, int] | None:
        """Where the web port listens (host, port; port 0: a free one), or None when off."""
        port = self.web_port
        if port is None:
            port = self.port + WEB_PORT_OFFSET if self.port else -1
        if port < 0:
            return None
        return (self.web_host or self.host, port)

    @property
    def lease_renew_s(self) -> float:
        """How often this replica renews its claims."""
        return self.lease_s / 3

    def tenant_keys(self) -> dict[str, list[str]]:
        """Every configured tenant with its keys (from api_keys and api_keys_file).

        Raises ValueError, naming the tenant and never a key, for a malformed mapping.
        """
        import json

        keys = check_tenant_keys(
            {
                tenant: [k.get_secret_value() for k in values]
                for tenant, values in self.api_keys.items()
            },
            "STORYREEL_GATEWAY_API_KEYS",
        )
        if self.api_keys_file:
            where = f"api_keys_file {self.api_keys_file}"
            try:
                text = self.api_keys_file.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {where}: {exc.strerror or exc}") from None
            try:
                loaded = json.loads(text)
            except ValueError as exc:
                # The decoder's message gives the position only, never the text.
                raise ValueError(
                    f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}"
                ) from None
            for tenant, values in check_tenant_keys(loaded, where).items():
                keys.setdefault(tenant, []).extend(values)
        return keys

    @field_validator("api_keys", mode="before")
    @classmethod
    def _one_key_as_a_list(cls, value: object) -> object:
        # {"acme": "k"} means {"acme": ["k"]}, as in api_keys_file.
        if isinstance(value, dict):
            return {t: [v] if isinstance(v, str) else v for t, v in value.items()}
        return value

    def retry_policy(self) -> RetryPolicy:
        """How a stage that failed with a transient status is retried (storyreel.retries)."""
        return RetryPolicy(
            initial_s=self.retry_initial_s,
            max_backoff_s=self.retry_max_backoff_s,
            give_up_after_s=self.retry_give_up_after_s,
        )

    @model_validator(mode="after")
    def _database_url_from_file(self) -> GatewaySettings:
        self.database_url = secret_setting(
            self.database_url, self.database_url_file, "STORYREEL_GATEWAY_DATABASE_URL"
        )
        return self

    @model_validator(mode="after")
    def _safe_defaults(self) -> GatewaySettings:
        if not self.min_scenes <= self.default_scenes <= self.max_scenes:
            raise ValueError("min_scenes <= default_scenes <= max_scenes must hold")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.web_port is None and self.port and self.port + WEB_PORT_OFFSET > 65535:
            raise ValueError(
                f"the web port would be port + {WEB_PORT_OFFSET} = {self.port + WEB_PORT_OFFSET}, "
                "beyond 65535: set web_port (-1 turns it off)"
            )
        tenant_keys = self.tenant_keys()
        web = self.web_bind
        for setting, host in (("host", self.host), ("web_host", web[0] if web else "")):
            if host and not any(tenant_keys.values()) and not is_loopback_host(host):
                raise ValueError(
                    f"the gateway has no API keys configured, so it listens only on a "
                    f"loopback address; {setting}={host!r} needs a tenant with a key in "
                    "STORYREEL_GATEWAY_API_KEYS or STORYREEL_GATEWAY_API_KEYS_FILE"
                )
        return self
