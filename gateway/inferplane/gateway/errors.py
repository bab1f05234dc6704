"""OpenAI-shaped errors: the one place gRPC statuses and HTTP failures become ``{"error": {...}}`` bodies.

Every failure the gateway reports is a ``GatewayError``. ``from_rpc_error`` maps a failed router or metering
call by its typed reason first (the ``google.rpc.ErrorInfo`` in ``grpc-status-details-bin``, see
``inferplane.common.wire``) and its status code second, through ``REASON_ERRORS`` (a registry, one row per
reason); ``from_validation_error`` maps pydantic errors to 400 with the offending field as ``param``, and
an unknown field (pydantic's ``extra_forbidden``) is OpenAI's "Unknown parameter: 'x'.", code
``unknown_parameter``; ``install_handlers`` makes FastAPI's own 404/405/422 use the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferplane.common import wire

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# nginx's "client closed request": the caller went away before the answer was ready.
CLIENT_CLOSED_REQUEST = 499
# Router metadata that is passed on to the HTTP caller as response headers (rate-limit state).
FORWARDED_HEADER_PREFIXES = ("x-ratelimit-", wire.RETRY_AFTER)
INTERNAL_MESSAGE = "The server had an error while processing your request. Sorry about that!"


@dataclass(eq=False)  # identity hash: exceptions are kept in sets by tracebacks and task groups
class GatewayError(Exception):
    """An error answer: HTTP status plus OpenAI's ``message``/``type``/``param``/``code``."""

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class _Row:
    status: int
    type: str
    code: str | None = None
    # None: pass the service's details on (they are written for callers); else this fixed message.
    message: str | None = None


_INTERNAL = _Row(500, SERVER_ERROR, None, INTERNAL_MESSAGE)
# OpenAI's answer to each reason (``ErrorReason`` in common.proto).
REASON_ERRORS: dict[wire.Reason, _Row] = {
    wire.REASON_MODEL_NOT_FOUND: _Row(404, INVALID_REQUEST, "model_not_found"),
    wire.REASON_NOT_FOUND: _Row(404, INVALID_REQUEST),  # an API key, a budget: not a model
    wire.REASON_INVALID_API_KEY: _Row(401, INVALID_REQUEST, "invalid_api_key"),
    wire.REASON_PERMISSION_DENIED: _Row(403, INVALID_REQUEST, "insufficient_permissions"),
    wire.REASON_INVALID_REQUEST: _Row(400, INVALID_REQUEST),
    wire.REASON_CONTEXT_LENGTH_EXCEEDED: _Row(400, INVALID_REQUEST, "context_length_exceeded"),
    wire.REASON_RATE_LIMITED: _Row(429, "rate_limit_exceeded", "rate_limit_exceeded"),
    # an exhausted budget is OpenAI's 429 "insufficient_quota", not a rate limit (retrying soon does not help)
    wire.REASON_INSUFFICIENT_QUOTA: _Row(429, wire.INSUFFICIENT_QUOTA, wire.INSUFFICIENT_QUOTA),
    # capacity, not the caller's quota: 503 with retry-after, as OpenAI answers "overloaded"
    wire.REASON_OVERLOADED: _Row(503, SERVER_ERROR, wire.OVERLOADED),
    wire.REASON_UNAVAILABLE: _Row(503, SERVER_ERROR, "service_unavailable",
                                  "The server is overloaded or not ready yet. Please retry."),
    wire.REASON_TIMEOUT: _Row(504, SERVER_ERROR, "timeout", "The request timed out."),
    wire.REASON_CANCELLED: _Row(CLIENT_CLOSED_REQUEST, INVALID_REQUEST, "request_cancelled",
                                "The request was cancelled."),
    wire.REASON_INTERNAL: _INTERNAL,
    # a flex request shed under overload: 429 with retry-after, as OpenAI answers flex requests it cannot serve
    wire.REASON_RESOURCE_UNAVAILABLE: _Row(429, SERVER_ERROR, "resource_unavailable"),
}
# A status that comes without a reason we know (a service from before typed reasons, a newer reason): the status
# decides, as it did before reasons existed, when the router's NOT_FOUND always meant the model.
STATUS_REASONS: dict[grpc.StatusCode, wire.Reason] = {**wire.REASON_FOR_STATUS,
                                                      grpc.StatusCode.NOT_FOUND: wire.REASON_MODEL_NOT_FOUND}


def forwarded_headers(metadata: wire.Metadata | None) -> dict[str, str]:
    """The router's rate-limit metadata (``x-ratelimit-*``, ``retry-after``) as HTTP headers."""
    return {k.lower(): wire.text(v) for k, v in metadata or ()
            if k.lower().startswith(FORWARDED_HEADER_PREFIXES)}


def reason_of(code: grpc.StatusCode, trailing: wire.Metadata | None,
              info: error_details_pb2.ErrorInfo | None = None) -> wire.Reason:
    """The reason of a failed call: its typed ErrorInfo detail (``info``, else read from ``trailing``), else the
    older ``x-inferplane-error-code`` trailer, else its status."""
    info = info if info is not None else wire.error_info(trailing)
    if info is not None and (reason := wire.reason_from_name(info.reason)) in REASON_ERRORS:
        return reason
    legacy = wire.metadata_value(trailing, wire.ERROR_CODE)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and legacy is not None:
        reason = wire.REASON_OF_ERROR_CODE.get(wire.text(legacy), wire.REASON_UNSPECIFIED)
        if reason in REASON_ERRORS:
            return reason
    return STATUS_REASONS.get(code, wire.REASON_INTERNAL)


def from_status(code: grpc.StatusCode, details: str | None, trailing: wire.Metadata | None = None) -> GatewayError:
    pairs = list(trailing or ())
    info = wire.error_info(pairs)
    row = REASON_ERRORS[reason_of(code, pairs, info)]
    param = info.metadata.get(wire.PARAM_INFO_KEY) if info is not None else None
    if param is None:
        value = wire.metadata_value(pairs, wire.PARAM)
        param = wire.text(value) if value is not None else None
    return GatewayError(row.status, row.message or details or code.name.lower(), type=row.type,
                        param=param, code=row.code, headers=forwarded_headers(pairs))


def from_rpc_error(exc: grpc.RpcError) -> GatewayError:
    """Map a failed router or metering call (``grpc.aio.AioRpcError``) to its OpenAI error."""
    err = from_status(exc.code(), exc.details(), exc.trailing_metadata())
    initial = exc.initial_metadata() if isinstance(exc, grpc.aio.AioRpcError) else None
    err.headers = {**forwarded_headers(initial), **err.headers}
    return err


def param_from_loc(loc: Iterable[int | str]) -> str | None:
    """``("messages", 0, "content")`` → ``"messages[0].content"`` (OpenAI's spelling of a nested param)."""
    out = ""
    for part in loc:
        if part == "body":  # FastAPI's prefix for body fields
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation(errors: list[Any]) -> GatewayError:
    first: Mapping[str, Any] = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return GatewayError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                                 "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    param = param_from_loc(first.get("loc", ()))
    msg = str(first.get("msg", "Invalid request"))
    msg = msg.removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif first.get("type") == "extra_forbidden":  # as OpenAI answers a field it does not know
        return GatewayError(400, f"Unknown parameter: '{param}'.", param=param,
                            code="unknown_parameter")
    elif param:
        msg = f"Invalid '{param}': {msg}"
    return GatewayError(400, msg, param=param)


def from_validation_error(exc: ValidationError | RequestValidationError) -> GatewayError:
    return _validation(list(exc.errors()))


def unauthenticated(message: str, *, code: str | None = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, code=code)


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than the limit of {limit} bytes.", code="request_too_large")


def _http_error(request: Request, exc: StarletteHTTPException) -> GatewayError:
    where = f"({request.method} {request.url.path})"
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return GatewayError(404, f"Invalid URL {where}", headers=headers)
    if exc.status_code == 405:
        return GatewayError(405, f"Invalid method for URL {where}", headers=headers)
    kind = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    return GatewayError(exc.status_code, str(exc.detail), type=kind, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Make every error the app itself answers (routing, validation, ours) OpenAI-shaped."""

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _http_error(request, exc).response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return from_validation_error(exc).response()

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_validation_error)
