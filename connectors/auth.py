"""Shared-secret authentication for the side channel and for the notes about holds (standard ``hmac``).

Engines of one deployment share a secret (``secret=`` bytes, or the environment: ``KVLAYOUT_CONNECTOR_SECRET``
holds it, ``KVLAYOUT_CONNECTOR_SECRET_FILE`` names a file holding it; at least 16 bytes). A handshake then
starts with a challenge-response in both directions before either side sends anything about itself:

    client -> server   {"type": "auth", "nonce": nc}
    server -> client   {"type": "challenge", "nonce": ns, "proof": mac(key, "server", nc, ns)}
    client -> server   {"type": "hello", "record": r, "proof": mac(key, "client", nc, ns, packb(r))}
    server -> client   welcome + {"proof": mac(key, "welcome", nc, ns, packb(welcome))}, or a refusal

A peer that cannot prove the key gets ``{"type": "refused"}`` with no reason, fields or values. Holds are
bound to their reader by a per-hold token the prefill engine hands out with ``hold_blocks`` (it travels
with the request, not over the side channel): notes and read confirmations carry ``mac(token, ...)``, so
only the engine that was given the hold can release it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional, Union

from kvlayout.errors import KVLayoutError

SECRET_ENV = "KVLAYOUT_CONNECTOR_SECRET"
SECRET_FILE_ENV = "KVLAYOUT_CONNECTOR_SECRET_FILE"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
TOKEN_BYTES = 16
MAC_BYTES = 32


def load_secret(secret: Union[bytes, str, None]) -> Optional[bytes]:
    """The shared secret: ``secret`` if given, else from the environment; None when there is none."""
    if secret is None:
        if os.environ.get(SECRET_FILE_ENV):
            path = Path(os.environ[SECRET_FILE_ENV])
            try:
                secret = path.read_bytes().strip()
            except OSError as e:
                raise KVLayoutError(f"{SECRET_FILE_ENV}={path}: cannot read the secret ({e})") from None
        elif os.environ.get(SECRET_ENV):
            secret = os.environ[SECRET_ENV]
        else:
            return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise KVLayoutError(f"the connector secret must be at least {MIN_SECRET_BYTES} bytes "
                            f"(e.g. secrets.token_hex(32)), got {len(secret) if isinstance(secret, bytes) else secret!r}")
    return secret


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def mac(key: bytes, label: str, *parts: Union[bytes, str]) -> bytes:
    """HMAC-SHA256 of ``label`` and ``parts``, each length-prefixed (no two inputs give one byte string)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in (label, *parts):
        b = p.encode() if isinstance(p, str) else bytes(p)
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.digest()


def verify(key: bytes, proof, label: str, *parts: Union[bytes, str]) -> bool:
    """Whether ``proof`` is ``mac(key, label, *parts)`` (constant-time)."""
    return isinstance(proof, bytes) and len(proof) == MAC_BYTES and hmac.compare_digest(proof, mac(key, label, *parts))


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
