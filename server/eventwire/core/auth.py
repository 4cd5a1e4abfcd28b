"""Customer authentication: JWT verification with pinned algorithms (docs/protocol.md section 5).

A token proves a customer when its signature checks against one of the
site's keys with that key's own algorithm (HS256 for a shared secret, RS256
for a public key; the token header only chooses which keys to try, never the
algorithm, and ``none`` is never accepted), ``aud`` is the site, ``sub`` is
the connection's uuid, and ``exp`` is in the future (``iat``/``nbf`` are
honoured), all with 30 s of leeway. Tokens and secrets never reach a log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import jwt
import msgspec

from eventwire.core.errors import EventwireError
from eventwire.core.rules import VerifyKey

LEEWAY: Final = 30
ACCEPTED_ALGORITHMS: Final = frozenset({"HS256", "RS256"})


class TokenRefused(EventwireError):
    """The token does not prove the customer; the message says why, without the token."""


class Proof(msgspec.Struct, frozen=True):
    """A verified token: who it proves and until when (Unix seconds)."""

    sub: str
    exp: float


def verify_token(token: str, keys: Sequence[VerifyKey], site: str, uuid: str) -> Proof:
    """Verify a customer token.

    Args:
        token: the compact JWT.
        keys: the site's keys (several during a rotation).
        site: the expected audience.
        uuid: the expected subject.

    Returns:
        The proof, with the token's expiry.

    Raises:
        TokenRefused: why the token proves nothing.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise TokenRefused("token is not a JWT") from None
    alg = header.get("alg")
    if alg not in ACCEPTED_ALGORITHMS:
        raise TokenRefused(f"token algorithm {alg!r} is not accepted")
    candidates = [k for k in keys if k.alg == alg]
    if not candidates:
        raise TokenRefused(f"this site has no {alg} key")
    for key in candidates:
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.alg],
                audience=site,
                leeway=LEEWAY,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.InvalidSignatureError:
            continue  # another key of a rotation may match
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token expired") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("token audience is not this site") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("token is not valid yet (nbf or iat in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"token has no {exc.claim} claim") from None
        except jwt.InvalidTokenError as exc:
            raise TokenRefused(f"token is invalid: {type(exc).__name__}") from None
        if claims["sub"] != uuid:
            raise TokenRefused("token subject is not this uuid")
        return Proof(sub=claims["sub"], exp=float(claims["exp"]))
    raise TokenRefused("token signature does not match any key of this site")
