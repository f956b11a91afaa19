"""The error catalogue: every failure a caller can see, by its documented code.

An ApiError carries the stable snake_case code, the message and the HTTP
status the contract gives it. The pipeline turns it into a gRPC status (with
google.rpc.ErrorInfo and, for field errors, google.rpc.BadRequest) or into the
REST envelope of the surface; nothing else decides how an error looks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One bad field. `field` is a dotted path in the request message (for
    example `cue.retry.max_attempts`), or, for problems found while reading
    a REST request, a location already prefixed `body.`, `query.`, `path.` or `header.`."""

    field: str
    message: str
    # The pydantic error type (missing, string_type, dict_type, literal_error,
    # value_error): the partner surface shows it, gRPC sends it as the reason.
    kind: str = ""


class ApiError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        http_status: int,
        violations: Sequence[Violation] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.violations = tuple(violations)

    def within(self, prefix: str) -> ApiError:
        """The same error with field paths given relative to the field `prefix`."""
        if not self.violations:
            return self
        return validation_error([Violation(f"{prefix}.{v.field}", v.message) for v in self.violations])


def validation_error(violations: Sequence[Violation]) -> ApiError:
    first = violations[0]
    return ApiError("validation_error", f"{first.field}: {first.message}", 422, violations)


def field_error(field: str, message: str) -> ApiError:
    return validation_error([Violation(field, message)])


def not_found(code: str, message: str) -> ApiError:
    return ApiError(code, message, 404)


def cue_not_found() -> ApiError:
    return not_found("cue_not_found", "Cue not found")


def execution_not_found() -> ApiError:
    return not_found("execution_not_found", "Execution not found")


def worker_not_found() -> ApiError:
    return not_found("worker_not_found", "Worker not found")


def invalid_api_key(message: str = "Invalid API key") -> ApiError:
    return ApiError("invalid_api_key", message, 401)


def key_rotated() -> ApiError:
    return ApiError("key_rotated", "This API key has been rotated. Use your new key.", 401)


def internal_error() -> ApiError:
    return ApiError("internal_error", "An internal error occurred", 500)


def service_unavailable() -> ApiError:
    return ApiError("service_unavailable", "The database is unreachable", 503)


def unreadable_body() -> ApiError:
    """Malformed JSON, or JSON cueline cannot hold (numbers beyond a double, lone surrogates)."""
    return ApiError("invalid_json", "Request body is not valid JSON", 400)


def idempotency_key_conflict() -> ApiError:
    return ApiError("idempotency_key_conflict", "Idempotency key already used with a different request", 409)


def rate_limit_exceeded(retry_after: int) -> ApiError:
    return ApiError("rate_limit_exceeded", f"Too many requests. Retry after {retry_after} seconds.", 429)


# --- the partner surface (contract partner-v2 section 9): reasons in upper case ---------------------


def partner_validation(violations: Sequence[Violation]) -> ApiError:
    return ApiError("VALIDATION_FAILED", violations[0].message, 422, violations)


def partner_unauthenticated() -> ApiError:
    return ApiError("UNAUTHENTICATED", "Unauthorized", 401)


def invalid_client() -> ApiError:
    return ApiError("INVALID_CLIENT", "invalid_client", 401)


def invalid_credentials() -> ApiError:
    return ApiError("INVALID_CREDENTIALS", "Invalid credentials", 401)


def invalid_secret() -> ApiError:
    return ApiError("INVALID_SECRET", "Invalid or expired secret", 403)


def action_not_found() -> ApiError:
    return ApiError("ACTION_NOT_FOUND", "Not Found", 404)


def no_attempt_in_progress() -> ApiError:
    return ApiError("NO_ATTEMPT_IN_PROGRESS", "Not Found", 404)


def unsupported_for_code() -> ApiError:
    return ApiError("UNSUPPORTED_FOR_CODE", "This action cannot be resolved with this endpoint", 409)


def concurrent_modification() -> ApiError:
    return ApiError("CONCURRENT_MODIFICATION", "Conflict", 409)
