"""Token material for tests: an HS256 secret, an RSA key pair, and a token maker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SECRET = "test-secret-0123456789-abcdefghijklmnop"
SECRET_ENV = "EVENTWIRE_TEST_JWT_SECRET"


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    """One RSA private key for the whole session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem() -> bytes:
    """The PEM of the test RSA public key."""
    return (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_public_pem(folder: Path) -> Path:
    """Write the test public key to folder/test.pem."""
    path = folder / "test.pem"
    path.write_bytes(public_pem())
    return path


def token(
    sub: str,
    aud: str,
    *,
    alg: str = "HS256",
    ttl: float = 300,
    key: Any = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A token for ``sub`` at site ``aud``, signed with the test secret or RSA key."""
    now = time.time()
    payload = {"sub": sub, "aud": aud, "iat": int(now), "exp": int(now + ttl), **claims}
    for name in drop:
        payload.pop(name, None)
    if key is None:
        key = SECRET if alg == "HS256" else rsa_key()
    return jwt.encode(payload, key, algorithm=alg)


def none_token(sub: str, aud: str) -> str:
    """An unsigned token (alg none), which must never be accepted."""
    return jwt.encode(
        {"sub": sub, "aud": aud, "exp": int(time.time() + 300)}, None, algorithm="none"
    )


def forged_hs256(sub: str, aud: str, secret: bytes) -> str:
    """An HS256 token signed by hand with any bytes as the secret (PyJWT refuses PEMs)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "aud": aud, "exp": int(time.time() + 300)}).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"
