"""Partner credentials: password hashes, OAuth client secrets, opaque tokens.

Tokens and client secrets are 32 random bytes, base64url; only their SHA-256
is stored. Passwords are PBKDF2-HMAC-SHA256 with a per-user salt, stored as
`pbkdf2_sha256$<iterations>$<salt>$<hash>` so the cost can rise later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

PBKDF2_ITERATIONS = 600_000


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_client_id() -> str:
    return "cl_" + secrets.token_hex(12)


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, expected = stored.split("$")
        rounds = int(iterations)
        salt_bytes = bytes.fromhex(salt)
    except ValueError:
        return False
    if scheme != "pbkdf2_sha256":
        return False
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8", "surrogatepass"), salt_bytes, rounds)
    return hmac.compare_digest(digest.hex(), expected)


# A hash to check against when the user does not exist, so a missing user
# costs as much time as a wrong password.
DUMMY_PASSWORD_HASH = f"pbkdf2_sha256${PBKDF2_ITERATIONS}${'00' * 16}${'00' * 32}"
