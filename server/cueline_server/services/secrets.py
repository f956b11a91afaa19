"""Action secrets: short-lived, URL-safe tokens that let one member act on one action.

    secret = kid "." body "." mac
    body   = base64url( 0x01 | action_id[16] | member_id[16] | issued_at[u64 BE] | nonce[8] )
    mac    = base64url( HMAC-SHA256(key[kid], ASCII(kid "." body)) )

Several keys verify, one signs, so keys rotate without breaking links in
flight: add the new key everywhere, switch the signing key id, wait an hour
(the longest a secret lives), then remove the old key. Secrets are never
stored or logged; attempts keep their SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import struct
import uuid
from dataclasses import dataclass

log = logging.getLogger("cueline.secrets")

VERSION = 1
LIFETIME = dt.timedelta(seconds=3600)
MAX_SKEW = dt.timedelta(seconds=60)
MIN_KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_BODY = struct.Struct(">B16s16sQ8s")


class InvalidSecret(Exception):
    """Why a secret failed, for the debug log only; callers see one message."""


@dataclass(frozen=True)
class VerifiedSecret:
    member_id: uuid.UUID
    issued_at: dt.datetime


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def parse_keys(spec: str) -> dict[str, bytes]:
    """`kid=base64url-key,kid2=...` into key ids and keys (each at least 32 bytes)."""
    keys: dict[str, bytes] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kid, sep, encoded = item.partition("=")
        kid = kid.strip()
        if not sep or not KEY_ID.fullmatch(kid):
            raise ValueError(f"key id {kid!r} must match [A-Za-z0-9_-]{{1,32}} and be followed by =KEY")
        try:
            key = _b64decode(encoded.strip().rstrip("="))
        except (ValueError, binascii.Error):
            raise ValueError(f"key {kid!r} is not base64url") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"key {kid!r} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
        keys[kid] = key
    return keys


def new_key() -> str:
    """A fresh key in the form the settings take."""
    return _b64encode(secrets.token_bytes(MIN_KEY_BYTES))


class SecretCodec:
    def __init__(self, keys: dict[str, bytes], signing_kid: str) -> None:
        if signing_kid not in keys:
            raise ValueError(f"the signing key id {signing_kid!r} is not among the keys")
        self._keys = dict(keys)
        self._signing_kid = signing_kid

    def _mac(self, key: bytes, signed: str) -> str:
        return _b64encode(hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest())

    def mint(self, action_id: uuid.UUID, member_id: uuid.UUID, now: dt.datetime) -> tuple[str, dt.datetime]:
        """A secret bound to the action and member, and when it expires."""
        issued = int(now.timestamp())
        raw = _BODY.pack(VERSION, action_id.bytes, member_id.bytes, issued, secrets.token_bytes(8))
        signed = f"{self._signing_kid}.{_b64encode(raw)}"
        expires = dt.datetime.fromtimestamp(issued, dt.UTC) + LIFETIME
        return f"{signed}.{self._mac(self._keys[self._signing_kid], signed)}", expires

    def verify(self, secret: str, action_id: uuid.UUID, now: dt.datetime) -> VerifiedSecret:
        """The member the secret speaks for; InvalidSecret names the failed check.
        The member's own checks (exists, enabled, in the organization) are the caller's."""
        if not secret.isascii():
            raise InvalidSecret("not ASCII")
        parts = secret.split(".")
        if len(parts) != 3:
            raise InvalidSecret("not three parts")
        kid, body, mac = parts
        key = self._keys.get(kid)
        if key is None:
            raise InvalidSecret("unknown key id")
        if not hmac.compare_digest(self._mac(key, f"{kid}.{body}"), mac):
            raise InvalidSecret("bad mac")
        try:
            raw = _b64decode(body)
            version, action_bytes, member_bytes, issued, _nonce = _BODY.unpack(raw)
        except (ValueError, binascii.Error, struct.error):
            raise InvalidSecret("malformed body") from None
        if version != VERSION:
            raise InvalidSecret("unknown version")
        if action_bytes != action_id.bytes:
            raise InvalidSecret("bound to another action")
        # Compared as seconds: a signed body can hold any 64-bit time, most of
        # which no datetime can.
        age = now.timestamp() - issued
        if -age > MAX_SKEW.total_seconds():
            raise InvalidSecret("issued in the future")
        if age > LIFETIME.total_seconds():
            raise InvalidSecret("expired")
        return VerifiedSecret(uuid.UUID(bytes=member_bytes), dt.datetime.fromtimestamp(issued, dt.UTC))


def codec_from_settings(keys_spec: str, signing_kid: str) -> SecretCodec:
    """The configured keys; without any, one random key for this process only."""
    keys = parse_keys(keys_spec)
    if not keys:
        log.warning(
            "CUELINE_ACTION_SECRET_KEYS is not set: action secrets use a random key that "
            "dies with this process and is not shared with other replicas"
        )
        return SecretCodec({"local": _b64decode(new_key())}, "local")
    return SecretCodec(keys, signing_kid or next(iter(keys)))
