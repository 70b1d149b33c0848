"""API keys: bearer tokens in the call metadata, mapped to tenants."""

from __future__ import annotations

import contextvars
import hashlib
import hmac

from storyreel.errors import Unauthenticated

#: Tenant of the call being served (set by the gateway's auth interceptor).
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")

#: The only tenant when no keys are configured (single-machine use).
LOCAL_TENANT = "local"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Resolves ``authorization: Bearer <key>`` to a tenant.

    Only digests of the keys are kept, and they are compared in constant time.
    With no keys configured every caller is the local tenant.
    """

    def __init__(self, tenant_keys: dict[str, list[str]]) -> None:
        self._tenants: list[tuple[bytes, str]] = [
            (_digest(key), tenant) for tenant, keys in tenant_keys.items() for key in keys if key
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant whose key the header carries; Unauthenticated if none matches."""
        if not self.enabled:
            return LOCAL_TENANT
        if not authorization:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
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
