"""eventwire/core/auth.py: token verification with pinned algorithms."""

from __future__ import annotations

import pytest

from eventwire.core.auth import TokenRefused, verify_token
from eventwire.core.rules import VerifyKey
from tests.keys import SECRET, forged_hs256, none_token, public_pem, rsa_key, token

HS = VerifyKey("HS256", SECRET.encode())


def rs() -> VerifyKey:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return VerifyKey("RS256", load_pem_public_key(public_pem()))


def test_valid_hs256_and_rs256() -> None:
    """Valid tokens of both algorithms prove the customer."""
    assert verify_token(token("u-1", "shop"), [HS], "shop", "u-1").sub == "u-1"
    assert verify_token(token("u-1", "shop", alg="RS256"), [HS, rs()], "shop", "u-1").sub == "u-1"


def test_rotation() -> None:
    """Any of several keys of one algorithm may have signed the token."""
    old = VerifyKey("HS256", b"an-old-secret-that-is-long-enough-32")
    assert verify_token(token("u-1", "shop"), [old, HS], "shop", "u-1").sub == "u-1"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: token("u-1", "shop", ttl=-120), "expired"),
        (lambda: token("u-1", "shop", key="another-secret-that-is-long-enough"), "signature"),
        (lambda: token("u-1", "other"), "audience"),
        (lambda: token("u-2", "shop"), "subject"),
        (lambda: token("u-1", "shop", drop=("exp",)), "exp"),
        (lambda: token("u-1", "shop", nbf=10**10), "not valid yet"),
        (lambda: none_token("u-1", "shop"), "'none'"),
        (lambda: "not.a.jwt", "not a JWT"),
    ],
)
def test_refused(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    """Expired, wrongly signed, wrong audience or subject, unsigned tokens are refused."""
    with pytest.raises(TokenRefused, match=reason):
        verify_token(make(), [HS, rs()], "shop", "u-1")


def test_algorithm_comes_from_the_key_not_the_header() -> None:
    """An HS256 token signed with the RSA public key (key confusion) proves nothing."""
    forged = forged_hs256("u-1", "shop", public_pem())
    with pytest.raises(TokenRefused):
        verify_token(forged, [rs()], "shop", "u-1")
    rs_token = token("u-1", "shop", alg="RS256", key=rsa_key())
    with pytest.raises(TokenRefused, match="no RS256 key"):
        verify_token(rs_token, [HS], "shop", "u-1")


def test_leeway() -> None:
    """A token expired less than 30 s ago is still taken."""
    assert verify_token(token("u-1", "shop", ttl=-10), [HS], "shop", "u-1").sub == "u-1"
