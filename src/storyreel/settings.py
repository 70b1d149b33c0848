"""Settings shared by every service.

Each service subclasses :class:`ServiceSettings` with its own environment
prefix (``STORYREEL_LLM_``, ``STORYREEL_DIFFUSION_``, ...). Storage is
configured once for the whole deployment with the ``STORYREEL_STORAGE_``
prefix, so every service reads and writes the same artifacts.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def read_secret_file(path: Path, setting: str) -> str:
    """The secret held in the file at ``path`` (a mounted Secret), without surrounding
    whitespace. ValueError, naming ``setting`` and the file but never its content, when it
    cannot be read or holds nothing."""
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ValueError(f"{setting}_FILE: cannot read {path}: {reason}") from None
    if not value:
        raise ValueError(f"{setting}_FILE: {path} is empty")
    return value


def secret_setting(value: str, path: Path | None, setting: str) -> str:
    """A secret given either as ``setting`` itself or as ``setting``_FILE (a file holding it).

    Both at once is an error (which one would win is a guess); the messages never show the
    secret.
    """
    if path is None:
        return value
    if value:
        raise ValueError(f"set {setting} or {setting}_FILE, not both")
    return read_secret_file(path, setting)


def is_loopback_host(host: str) -> bool:
    """Whether a listening address is on this machine's loopback only (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StorageSettings(BaseSettings):
    """Where artifacts (images, audio, video, manifests) live."""

    # hide_input_in_errors: an error about a setting must not print the keys.
    model_config = SettingsConfigDict(
        env_prefix="STORYREEL_STORAGE_", extra="ignore", hide_input_in_errors=True
    )

    # file:///absolute/dir for one machine, s3://bucket[/prefix] for MinIO or any S3 server.
    url: str = Field(default_factory=lambda: (Path.cwd() / "data" / "artifacts").as_uri())
    # host:port of the S3 endpoint, used with s3:// URLs.
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    # The same keys as files (mounted Secrets), whitespace around them stripped. Each is
    # an alternative to the variable above: setting both is an error.
    s3_access_key_file: Path | None = None
    s3_secret_key_file: Path | None = None
    s3_secure: bool = False
    s3_region: str | None = None
    # host:port callers outside the cluster use to reach S3, for presigned URLs (the
    # signature covers the host). Empty: the same as s3_endpoint.
    s3_public_endpoint: str = ""
    s3_public_secure: bool | None = None
    # Lifetime of presigned download URLs handed to callers.
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _keys_from_files(self) -> StorageSettings:
        self.s3_access_key = secret_setting(
            self.s3_access_key, self.s3_access_key_file, "STORYREEL_STORAGE_S3_ACCESS_KEY"
        )
        self.s3_secret_key = SecretStr(
            secret_setting(
                self.s3_secret_key.get_secret_value(),
                self.s3_secret_key_file,
                "STORYREEL_STORAGE_S3_SECRET_KEY",
            )
        )
        return self


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
    # A connection with no call for this long is closed (the client reconnects when it
    # needs to), so idle clients hold no server resources.
    max_connection_idle_s: float = Field(default=300.0, gt=0)
    # The server pings a connection quiet for keepalive_time_s and closes it if no answer
    # comes within keepalive_timeout_s: dead peers (a vanished pod, a cut NAT) are found.
    keepalive_time_s: float = Field(default=60.0, gt=0)
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    # Clients may send keepalive pings this often (more often is a protocol abuse that
    # the server answers with GOAWAY).
    min_client_ping_interval_s: float = Field(default=10.0, gt=0)


#: Fewest characters an internal token may have (``make internal-token`` and
#: ``openssl rand -hex 32`` give 64; a short one could be guessed).
MIN_INTERNAL_TOKEN_CHARS = 16


class InternalSettings(BaseSettings):
    """How storyreel's services trust each other (environment prefix ``STORYREEL_INTERNAL_``).

    The deployment's internal token: the gateway presents it with every call to the
    llm, diffusion and composer services, which refuse calls without it. Optionally
    mutual TLS: servers require a client certificate signed by ``tls_ca_file``, and
    clients present ``tls_cert_file`` and verify the server against the same CA.
    Every service of one deployment gets the same settings.
    """

    # hide_input_in_errors: an error about a setting must not print the token.
    model_config = SettingsConfigDict(
        env_prefix="STORYREEL_INTERNAL_", extra="ignore", hide_input_in_errors=True
    )

    # The token itself, or (token_file) a file that holds it, whitespace around it
    # stripped: a mounted Secret. Not both. At least MIN_INTERNAL_TOKEN_CHARS printable
    # ASCII characters, no spaces.
    token: SecretStr = SecretStr("")
    token_file: Path | None = None
    # Mutual TLS between the services, in PEM files: the CA that signs every service's
    # certificate, this service's certificate and its private key. All three or none.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _resolve(self) -> InternalSettings:
        token = secret_setting(
            self.token.get_secret_value().strip(), self.token_file, "STORYREEL_INTERNAL_TOKEN"
        )
        if token:
            if len(token) < MIN_INTERNAL_TOKEN_CHARS:
                raise ValueError(
                    f"STORYREEL_INTERNAL_TOKEN is {len(token)} characters long; it needs at "
                    f"least {MIN_INTERNAL_TOKEN_CHARS} (make internal-token, or openssl rand "
                    "-hex 32)"
                )
            if not all("!" <= c <= "~" for c in token):
                raise ValueError(
                    "STORYREEL_INTERNAL_TOKEN may hold only printable ASCII characters "
                    "without spaces (it travels in a gRPC header)"
                )
        self.token = SecretStr(token)
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(files) and not all(files):
            raise ValueError(
                "set all three of STORYREEL_INTERNAL_TLS_CA_FILE, ..._TLS_CERT_FILE and "
                "..._TLS_KEY_FILE, or none"
            )
        return self

    @property
    def token_value(self) -> str | None:
        """The token, or None when none is configured."""
        return self.token.get_secret_value() or None

    @property
    def tls(self) -> bool:
        """Whether the services talk mutual TLS."""
        return self.tls_ca_file is not None

    @property
    def authenticates(self) -> bool:
        """Whether callers must prove who they are (a token, a client certificate or both)."""
        return self.token_value is not None or self.tls

    def tls_files(self) -> tuple[bytes, bytes, bytes]:
        """The CA, certificate and key PEM bytes; ValueError naming an unreadable file."""
        assert self.tls_ca_file and self.tls_cert_file and self.tls_key_file
        contents = []
        for setting, path in (
            ("STORYREEL_INTERNAL_TLS_CA_FILE", self.tls_ca_file),
            ("STORYREEL_INTERNAL_TLS_CERT_FILE", self.tls_cert_file),
            ("STORYREEL_INTERNAL_TLS_KEY_FILE", self.tls_key_file),
        ):
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                raise ValueError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
        ca, cert, key = contents
        return ca, cert, key
