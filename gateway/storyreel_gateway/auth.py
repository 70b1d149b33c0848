"""API keys: bearer tokens in the call metadata, mapped to tenants.

A configured key is either the key itself or its SHA-256 digest written as
``sha256:<64 hex digits>`` (``printf %s "$KEY" | sha256sum``), so that the keys
file need not hold the keys. Only digests are kept in memory either way, and
they are compared in constant time. Nothing here ever puts a key in an error
message or a log line.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence

from storyreel.errors import Unauthenticated

#: Tenant of the call being served (set by the gateway's auth interceptor).
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")

#: The only tenant when no keys are configured (single-machine use).
LOCAL_TENANT = "local"

#: How a configured key is given as its digest instead of itself.
DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"[0-9a-fA-F]{64}")
_MAX_TENANT_CHARS = 128


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_digest(key: str) -> str:
    """The ``sha256:<hex>`` form of ``key``, for a keys file that holds no plain keys."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def check_tenant_keys(tenant_keys: Mapping[str, object], where: str = "api_keys") -> dict:
    """Return ``{tenant: [key, ...]}`` with surrounding spaces stripped, or raise ValueError.

    Each tenant needs at least one key; a tenant's keys are a string or a list of
    strings; no key is empty; a ``sha256:`` key carries 64 hex digits. Messages name
    the tenant and the rule, never a key.
    """
    if not isinstance(tenant_keys, Mapping):
        raise ValueError(f"{where} must be a JSON object of tenant -> keys")
    checked: dict[str, list[str]] = {}
    for tenant, values in tenant_keys.items():
        if not isinstance(tenant, str) or not tenant.strip():
            raise ValueError(f"{where}: a tenant name must be a non-empty string")
        if len(tenant) > _MAX_TENANT_CHARS:
            raise ValueError(f"{where}: tenant names are at most {_MAX_TENANT_CHARS} characters")
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
            raise ValueError(
                f"{where}: the keys of tenant {tenant!r} must be a string or a list of strings"
            )
        keys = [v.strip() for v in values]
        if not keys:
            raise ValueError(f"{where}: tenant {tenant!r} has no keys")
        if any(not k for k in keys):
            raise ValueError(f"{where}: tenant {tenant!r} has an empty key")
        for key in keys:
            if key.startswith(DIGEST_PREFIX) and not _DIGEST_RE.fullmatch(
                key[len(DIGEST_PREFIX) :]
            ):
                raise ValueError(
                    f"{where}: a key of tenant {tenant!r} starts with {DIGEST_PREFIX!r} "
                    "but is not followed by exactly 64 hex digits"
                )
        checked.setdefault(tenant, []).extend(keys)
    return checked


def _stored_digest(key: str) -> bytes:
    if key.startswith(DIGEST_PREFIX) and _DIGEST_RE.fullmatch(key[len(DIGEST_PREFIX) :]):
        return bytes.fromhex(key[len(DIGEST_PREFIX) :])
    return _digest(key)


class ApiKeys:
    """Resolves ``authorization: Bearer <key>`` to a tenant.

    Only digests of the keys are kept, and they are compared in constant time.
    With no keys configured every caller is the local tenant.
    """

    def __init__(self, tenant_keys: dict[str, list[str]]) -> None:
        self._tenants: list[tuple[bytes, str]] = [
            (_stored_digest(key.strip()), tenant)
            for tenant, keys in tenant_keys.items()
            for key in keys
            if key.strip()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant_for(self, authorization: str | Sequence[str] | None) -> str:
        """The tenant whose key the header carries; Unauthenticated if none matches.

        ``authorization`` is the header's value, or every value the call carried:
        more than one ``authorization`` header is refused.
        """
        values = (
            []
            if authorization is None
            else [authorization]
            if isinstance(authorization, str)
            else list(authorization)
        )
        if len(values) > 1:
            raise Unauthenticated("more than one authorization header: send exactly one")
        if not self.enabled:
            return LOCAL_TENANT
        header = values[0] if values else ""
        if not header:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization header: expected 'Bearer <key>'")
        digest = _digest(key.strip())
        found = ""
        for known, tenant in self._tenants:
            if hmac.compare_digest(known, digest):
                found = tenant
        if not found:
            raise Unauthenticated("unknown API key")
        return found
