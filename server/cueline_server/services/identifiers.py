"""Identifiers, API keys and webhook secrets."""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import uuid

_CUE_ALPHABET = string.ascii_lowercase + string.digits
_CUE_ID = re.compile(r"^cue_[a-z0-9]{12}$")
_API_KEY = re.compile(r"^cue_sk_[0-9a-f]{32}$")


def new_cue_id() -> str:
    return "cue_" + "".join(secrets.choice(_CUE_ALPHABET) for _ in range(12))


def is_cue_id(value: str) -> bool:
    return bool(_CUE_ID.match(value))


def parse_uuid(value: str) -> uuid.UUID | None:
    """A UUID in any case and in canonical form, or None (malformed ids are 'not found')."""
    if len(value) != 36:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def new_api_key() -> str:
    return "cue_sk_" + secrets.token_hex(16)


def looks_like_api_key(value: str) -> bool:
    return bool(_API_KEY.match(value))


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_hex(32)
