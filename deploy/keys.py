#!/usr/bin/env python3
"""Create the secrets a storyreel deployment needs: gateway API keys and the internal token.

    python3 deploy/keys.py api-key TENANT [--file deploy/secrets/api-keys.json] [--plain]
    python3 deploy/keys.py internal-token [--file deploy/secrets/internal-token]

``api-key`` makes a new random key for TENANT, adds it to the gateway's keys file (a JSON
object, tenant -> list of keys; ``STORYREEL_GATEWAY_API_KEYS_FILE``) and prints the key on
standard output, once: give it to the tenant. The file keeps only the key's SHA-256
(``sha256:<64 hex>``), so neither it nor the Secret made from it reveals a key; ``--plain``
stores the key itself instead. Run it again to give a tenant a second key (rotation: add
the new key, move the clients, then delete the old entry from the file).

``internal-token`` writes a random per-deployment token that every service presents to
the others (``STORYREEL_INTERNAL_TOKEN_FILE``); it leaves an existing file alone.

Both files go into a folder only their owner may enter (0700); the files themselves are
readable by all (0644), because the containers read them as their own user (uid 10001)
through Docker Compose's bind mounts, which keep the host's owner and mode. ``make
api-key TENANT=...`` and ``make internal-token`` run this with the defaults
(docs/deploy.md). Standard library only: any Python 3.9+ runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_KEYS = HERE / "secrets" / "api-keys.json"
DEFAULT_TOKEN = HERE / "secrets" / "internal-token"
#: Tenant names: what the gateway stores with each job, so short and plain.
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_MODE = 0o644
DIR_MODE = 0o700


def digest(key: str) -> str:
    """The form of ``key`` kept in the keys file: ``sha256:`` and its hex SHA-256."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A random API key: 256 bits, URL-safe, with a prefix that says what it is."""
    return "sr_" + secrets.token_urlsafe(32)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, in a folder only its owner may enter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(DIR_MODE)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_api_key(path: Path, tenant: str, *, plain: bool = False) -> str:
    """Add a new key for ``tenant`` to the keys file at ``path``; return the key."""
    if not TENANT.fullmatch(tenant):
        raise ValueError(
            f"tenant names are 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit; not {tenant!r}"
        )
    keys: dict[str, list[str]] = {}
    if path.exists():
        loaded = json.loads(path.read_text() or "{}")
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a JSON object of tenant -> list of keys")
        for name, values in loaded.items():
            keys[name] = [values] if isinstance(values, str) else list(values)
    key = new_key()
    keys.setdefault(tenant, []).append(key if plain else digest(key))
    write_private(path, json.dumps(keys, indent=2, sort_keys=True) + "\n")
    return key


def make_internal_token(path: Path, *, force: bool = False) -> bool:
    """Write a new internal token to ``path`` unless one is there; True if written."""
    if path.exists() and path.stat().st_size and not force:
        return False
    # No trailing newline: the file is the token, byte for byte.
    write_private(path, secrets.token_hex(32))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/keys.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    api = sub.add_parser("api-key", help="add a new API key for a tenant and print it")
    api.add_argument("tenant")
    api.add_argument("--file", type=Path, default=DEFAULT_KEYS, help="the keys file")
    api.add_argument(
        "--plain", action="store_true", help="store the key itself, not its SHA-256 digest"
    )
    token = sub.add_parser("internal-token", help="write the internal token if there is none")
    token.add_argument("--file", type=Path, default=DEFAULT_TOKEN, help="the token file")
    token.add_argument("--force", action="store_true", help="replace an existing token")
    args = parser.parse_args(argv)

    try:
        if args.command == "api-key":
            key = add_api_key(args.file, args.tenant, plain=args.plain)
            print(key)
            stored = "the key" if args.plain else "its SHA-256"
            print(
                f"new API key for tenant {args.tenant!r} above (shown once); {args.file} "
                f"keeps {stored}",
                file=sys.stderr,
            )
        else:
            written = make_internal_token(args.file, force=args.force)
            verb = "wrote a new" if written else "kept the existing"
            print(f"{verb} internal token in {args.file}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"deploy/keys.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
