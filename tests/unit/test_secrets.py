"""Action secrets and redirect templates, without a server."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import uuid

import pytest

from cueline_server.services import secrets as secrets_module
from cueline_server.services.actions import render_template
from cueline_server.services.secrets import InvalidSecret, SecretCodec, new_key, parse_keys

NOW = dt.datetime(2026, 6, 2, 8, 30, tzinfo=dt.UTC)


def test_a_secret_is_url_safe_and_verifies_only_for_its_action() -> None:
    codec = SecretCodec(parse_keys(f"k1={new_key()}"), "k1")
    action, member = uuid.uuid4(), uuid.uuid4()
    secret, expires = codec.mint(action, member, NOW)
    assert re.fullmatch(r"k1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", secret)
    assert expires == NOW + dt.timedelta(seconds=3600)
    assert codec.verify(secret, action, NOW + dt.timedelta(seconds=3600)).member_id == member
    with pytest.raises(InvalidSecret, match="expired"):
        codec.verify(secret, action, NOW + dt.timedelta(seconds=3601))
    with pytest.raises(InvalidSecret, match="another action"):
        codec.verify(secret, uuid.uuid4(), NOW)
    tampered = secret[:-2] + ("AA" if not secret.endswith("AA") else "BB")
    with pytest.raises(InvalidSecret, match="bad mac"):
        codec.verify(tampered, action, NOW)


@pytest.mark.parametrize(
    ("issued", "problem"),
    [(2**64 - 1, "issued in the future"), (2**40, "issued in the future"), (0, "expired")],
)
def test_a_signed_time_beyond_the_calendar_is_refused(issued: int, problem: str) -> None:
    """A body signed with the right key can hold any 64-bit time; one past what
    a datetime holds is refused like any other bad time, not an error."""
    key = new_key()
    codec = SecretCodec(parse_keys(f"k1={key}"), "k1")
    action = uuid.uuid4()
    raw = secrets_module._BODY.pack(
        secrets_module.VERSION, action.bytes, uuid.uuid4().bytes, issued, bytes(8)
    )
    signed = f"k1.{secrets_module._b64encode(raw)}"
    mac = secrets_module._b64encode(
        hmac.new(parse_keys(f"k1={key}")["k1"], signed.encode(), hashlib.sha256).digest()
    )
    with pytest.raises(InvalidSecret, match=problem):
        codec.verify(f"{signed}.{mac}", action, NOW)


def test_rotation_keeps_old_secrets_valid() -> None:
    old, new = new_key(), new_key()
    before = SecretCodec(parse_keys(f"old={old}"), "old")
    after = SecretCodec(parse_keys(f"old={old},new={new}"), "new")
    action, member = uuid.uuid4(), uuid.uuid4()
    secret = before.mint(action, member, NOW)[0]
    assert after.verify(secret, action, NOW).member_id == member
    assert after.mint(action, member, NOW)[0].startswith("new.")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("k1=c2hvcnQ", "at least 32"),
        ("bad id!=" + "A" * 43, "key id"),
        ("k1", "key id"),
        ("k1=***", "base64url"),
    ],
)
def test_bad_key_settings_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_keys(spec)


def test_template_values_are_percent_encoded() -> None:
    rendered = render_template(
        "https://x.example/r?a={attempt}&s={success_url}&l={language}",
        {"attempt": "id-1", "success_url": "https://a.example/p?q=1&r=ä ~", "language": "", "cancel_url": ""},
    )
    assert rendered == "https://x.example/r?a=id-1&s=https%3A%2F%2Fa.example%2Fp%3Fq%3D1%26r%3D%C3%A4%20~&l="
