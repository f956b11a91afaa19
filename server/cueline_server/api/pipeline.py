"""One call pipeline for both transports: authenticate -> validate -> handle,
with every failure turned into an ApiError from the catalogue.

The gRPC server and the REST transcoder only adapt their wire format to
`Pipeline.invoke`; neither authenticates, validates or maps errors itself.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from sqlalchemy.exc import DBAPIError, OperationalError

from cueline.annotations.v1 import annotations_pb2 as cueline_options
from cueline_server.api.descriptors import MethodInfo
from cueline_server.api.validation import validate
from cueline_server.errors import ApiError, internal_error, service_unavailable, validation_error
from cueline_server.logs import request_id
from cueline_server.services.accounts import Authenticator, Caller
from cueline_server.services.partners import PartnerCaller

log = logging.getLogger("cueline.calls")


@dataclass(frozen=True)
class Call:
    """What a handler knows about the call besides its request."""

    caller: Caller | None
    metadata: Mapping[str, str]  # lower-case names: gRPC metadata or HTTP headers
    request_id: str
    partner: PartnerCaller | None = None
    # The client's address: the gRPC peer, or the HTTP client (behind a
    # trusted proxy, the left-most X-Forwarded-For entry).
    peer: str = ""

    @property
    def account(self) -> Caller:
        assert self.caller is not None, "public methods have no caller"
        return self.caller

    @property
    def partner_caller(self) -> PartnerCaller:
        assert self.partner is not None, "only partner-token methods have a partner"
        return self.partner


Handler = Callable[[Any, Call], Awaitable[Message]]
PartnerAuthenticator = Callable[[str | None], Awaitable[PartnerCaller]]


class Pipeline:
    def __init__(
        self,
        authenticator: Authenticator,
        handlers: Mapping[str, Handler],
        *,
        partner_authenticator: PartnerAuthenticator,
        access_log: bool,
    ) -> None:
        self._authenticator = authenticator
        self._partner_authenticator = partner_authenticator
        self._handlers = handlers
        self._access_log = access_log

    @staticmethod
    def new_request_id(offered: str | None = None) -> str:
        """Use a caller's id when it is a sane token, else a fresh UUID."""
        if offered and len(offered) <= 128 and offered.isascii() and offered.isprintable():
            return offered
        return str(uuid.uuid4())

    async def invoke(
        self,
        method: MethodInfo,
        request: Message,
        metadata: Mapping[str, str],
        rid: str,
        *,
        peer: str = "",
        rejection: ApiError | None = None,
    ) -> Message:
        """`rejection` is a problem the transport found reading the request;
        it is raised after authentication, so a caller without credentials
        learns nothing about the request's shape."""
        token = request_id.set(rid)
        started = time.perf_counter()
        outcome = "ok"
        try:
            caller = partner = None
            if method.rules.auth == cueline_options.AUTH_PARTNER_TOKEN:
                partner = await self._partner_authenticator(metadata.get("authorization"))
            elif not method.public:
                caller = await self._authenticator.authenticate(metadata.get("authorization"))
            if rejection is not None:
                raise rejection
            violations = validate(request, method.path_fields)
            if violations:
                raise validation_error(violations)
            call = Call(caller, metadata, rid, partner, peer)
            return await self._handlers[method.full_name](request, call)
        except ApiError as exc:
            outcome = exc.code
            raise
        except (OperationalError, DBAPIError) as exc:
            if getattr(exc, "connection_invalidated", False) or isinstance(exc, OperationalError):
                log.error("database unavailable in %s: %s", method.full_name, exc)
                outcome = "service_unavailable"
                raise service_unavailable() from exc
            log.exception("database error in %s", method.full_name)
            outcome = "internal_error"
            raise internal_error() from exc
        except Exception as exc:
            log.exception("unhandled error in %s", method.full_name)
            outcome = "internal_error"
            raise internal_error() from exc
        finally:
            if self._access_log:
                log.info("%s %s %.1fms", method.full_name, outcome, (time.perf_counter() - started) * 1000)
            request_id.reset(token)
