"""The wire contracts every process shares, defined once: metadata keys, bearer parsing, the request-id rule,
finish reasons, budget names, and error reasons with their ``google.rpc`` encoding.

Nothing here imports a service; services, the gateway and the CLI import from here. Nothing here raises a
domain error either: callers decide what a refusal is (``Unauthenticated`` in a gRPC service, a 401 body in
the gateway), with the texts defined here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from inferplane.v1 import common_pb2, metering_pb2

# gRPC metadata as the grpc libraries hand it over: (key, str | bytes) pairs (``grpc.aio.Metadata``, tuples, or
# what grpc-stubs types more loosely).
Metadata: TypeAlias = Iterable[Any]

# --- metadata keys (gRPC metadata and the matching HTTP headers) -------------------------------------------

AUTHORIZATION: Final = "authorization"
REQUEST_ID: Final = "x-request-id"
# The offending request field of an error (OpenAI's ``param``); also in the ErrorInfo detail's metadata.
PARAM: Final = "x-inferplane-param"
# The machine-readable reason of a refusal beside its status (``insufficient_quota``, ``overloaded``); kept for
# callers that read trailers. The typed reason is the ``google.rpc.ErrorInfo`` detail in ``STATUS_DETAILS``.
ERROR_CODE: Final = "x-inferplane-error-code"
RETRY_AFTER: Final = "retry-after"
# gRPC's standard trailer for a serialized ``google.rpc.Status`` (what ``grpc_status.rpc_status`` reads).
STATUS_DETAILS: Final = "grpc-status-details-bin"


def text(value: str | bytes) -> str:
    """A metadata value as text (binary values are decoded leniently)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def metadata_value(metadata: Metadata | None, key: str) -> str | bytes | None:
    """The first value of ``key`` (case-insensitive) in gRPC metadata, or None."""
    for name, value in metadata or ():
        if name.lower() == key:
            return value
    return None


# --- bearer keys -------------------------------------------------------------------------------------------

# OpenAI's text, the one every process answers a missing key with.
MISSING_KEY: Final = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                      "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
MALFORMED_KEY: Final = "The Authorization header must be 'Bearer YOUR_KEY'."
INCORRECT_KEY: Final = "Incorrect API key provided."


def parse_bearer(value: str | bytes | None) -> str | None:
    """The key in an ``Authorization`` value (``Bearer KEY``, scheme case-insensitive), or None when there is
    no value, another scheme, an empty key, or a key with white space in it (no key has any)."""
    if value is None:
        return None
    scheme, _, token = text(value).strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None
    return token


def key_refusal(value: str | bytes | None) -> str:
    """Why ``parse_bearer`` found no key in ``value``: ``MISSING_KEY`` when there is no value (or a blank one),
    else ``MALFORMED_KEY``."""
    return MISSING_KEY if value is None or not text(value).strip() else MALFORMED_KEY


def bearer_from_metadata(metadata: Metadata | None) -> str | None:
    """The bearer key in gRPC metadata, or None (missing or malformed)."""
    return parse_bearer(metadata_value(metadata, AUTHORIZATION))


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries ``key``."""
    return ((AUTHORIZATION, f"Bearer {key}"),)


# --- request ids -------------------------------------------------------------------------------------------

MAX_REQUEST_ID_LENGTH: Final = 128
# What gRPC metadata can carry and what the ledger accepts: 1-128 printable ASCII characters, no space.
_REQUEST_ID_RE = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_LENGTH}}}")
BAD_REQUEST_ID: Final = "x-request-id must be 1-128 printable ASCII characters without spaces."


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID_RE.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


# --- finish reasons ----------------------------------------------------------------------------------------

# The names a generation ends with, everywhere below the edge (Triton's model sends them, the ledger stores
# them). The protobuf enum ``common_pb2.FinishReason`` carries them between processes; OpenAI's names are the
# same words (``stop`` and ``length``; the other two are failures, answered as errors at the edge).
STOP: Final = "stop"
LENGTH: Final = "length"
CANCELLED: Final = "cancelled"
ERROR: Final = "error"
FINISH_REASONS: Final = (STOP, LENGTH, CANCELLED, ERROR)
FINISH_TO_PB: Final = {STOP: common_pb2.FINISH_REASON_STOP, LENGTH: common_pb2.FINISH_REASON_LENGTH,
                       CANCELLED: common_pb2.FINISH_REASON_CANCELLED, ERROR: common_pb2.FINISH_REASON_ERROR}
# OpenAI's finish reason of a choice that ended with tool calls: public only (the usage record says "stop").
TOOL_CALLS: Final = "tool_calls"
FINISH_FROM_PB: Final = {**{v: k for k, v in FINISH_TO_PB.items()}, common_pb2.FINISH_REASON_TOOL_CALLS: TOOL_CALLS}

# --- budgets -----------------------------------------------------------------------------------------------

# The names metering stores and the REST admin API speaks; the protobuf enums carry them over gRPC.
SCOPE_KEY: Final = "key"
SCOPE_TENANT: Final = "tenant"
PERIOD_DAILY: Final = "daily"
PERIOD_MONTHLY: Final = "monthly"
BUDGET_SCOPES: Final = {SCOPE_KEY: metering_pb2.BUDGET_SCOPE_KEY, SCOPE_TENANT: metering_pb2.BUDGET_SCOPE_TENANT}
BUDGET_SCOPE_NAMES: Final = {v: k for k, v in BUDGET_SCOPES.items()}
BUDGET_PERIODS: Final = {PERIOD_DAILY: metering_pb2.BUDGET_PERIOD_DAILY,
                         PERIOD_MONTHLY: metering_pb2.BUDGET_PERIOD_MONTHLY}
BUDGET_PERIOD_NAMES: Final = {v: k for k, v in BUDGET_PERIODS.items()}
# What BUDGET_PERIOD_UNSPECIFIED means when a budget is set.
DEFAULT_BUDGET_PERIOD: Final = PERIOD_MONTHLY

# --- error codes (the values of ERROR_CODE, kept for trailer readers) --------------------------------------

INSUFFICIENT_QUOTA: Final = "insufficient_quota"
OVERLOADED: Final = "overloaded"

# --- error reasons (google.rpc.ErrorInfo) ------------------------------------------------------------------

# The ErrorInfo domain of inferplane's reasons; ErrorInfo.reason is an ``ErrorReason`` value's name.
ERROR_DOMAIN: Final = "inferplane.dev"
# The ErrorInfo metadata key naming the offending request field.
PARAM_INFO_KEY: Final = "param"

Reason: TypeAlias = common_pb2.ErrorReason
REASON_UNSPECIFIED: Final = common_pb2.ERROR_REASON_UNSPECIFIED
REASON_MODEL_NOT_FOUND: Final = common_pb2.ERROR_REASON_MODEL_NOT_FOUND
REASON_INVALID_API_KEY: Final = common_pb2.ERROR_REASON_INVALID_API_KEY
REASON_INSUFFICIENT_QUOTA: Final = common_pb2.ERROR_REASON_INSUFFICIENT_QUOTA
REASON_RATE_LIMITED: Final = common_pb2.ERROR_REASON_RATE_LIMITED
REASON_OVERLOADED: Final = common_pb2.ERROR_REASON_OVERLOADED
REASON_INVALID_REQUEST: Final = common_pb2.ERROR_REASON_INVALID_REQUEST
REASON_PERMISSION_DENIED: Final = common_pb2.ERROR_REASON_PERMISSION_DENIED
REASON_NOT_FOUND: Final = common_pb2.ERROR_REASON_NOT_FOUND
REASON_CONTEXT_LENGTH_EXCEEDED: Final = common_pb2.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED
REASON_UNAVAILABLE: Final = common_pb2.ERROR_REASON_UNAVAILABLE
REASON_TIMEOUT: Final = common_pb2.ERROR_REASON_TIMEOUT
REASON_CANCELLED: Final = common_pb2.ERROR_REASON_CANCELLED
REASON_INTERNAL: Final = common_pb2.ERROR_REASON_INTERNAL
REASON_RESOURCE_UNAVAILABLE: Final = common_pb2.ERROR_REASON_RESOURCE_UNAVAILABLE

# Service tiers (OpenAI's ``service_tier``; "auto" is "default"), by name and on the wire.
DEFAULT_TIER: Final = "default"
FLEX_TIER: Final = "flex"
PRIORITY_TIER: Final = "priority"
TIER_TO_PB: Final = {DEFAULT_TIER: common_pb2.SERVICE_TIER_DEFAULT, FLEX_TIER: common_pb2.SERVICE_TIER_FLEX,
                     PRIORITY_TIER: common_pb2.SERVICE_TIER_PRIORITY}
TIER_FROM_PB: Final = {**{v: k for k, v in TIER_TO_PB.items()}, common_pb2.SERVICE_TIER_UNSPECIFIED: DEFAULT_TIER}

# The reason an error has when nothing more precise is known than its status (a domain error's default, a
# status that passes through from elsewhere without a detail).
REASON_FOR_STATUS: Final[Mapping[grpc.StatusCode, Reason]] = {
    grpc.StatusCode.INVALID_ARGUMENT: REASON_INVALID_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: REASON_INVALID_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: REASON_INVALID_REQUEST,
    grpc.StatusCode.NOT_FOUND: REASON_NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: REASON_INVALID_API_KEY,
    grpc.StatusCode.PERMISSION_DENIED: REASON_PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: REASON_RATE_LIMITED,
    grpc.StatusCode.UNAVAILABLE: REASON_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: REASON_TIMEOUT,
    grpc.StatusCode.CANCELLED: REASON_CANCELLED,
}
# Reasons that also go out as an ERROR_CODE trailer (what they were before the typed detail existed).
ERROR_CODE_OF_REASON: Final[Mapping[Reason, str]] = {REASON_INSUFFICIENT_QUOTA: INSUFFICIENT_QUOTA,
                                                     REASON_OVERLOADED: OVERLOADED}
REASON_OF_ERROR_CODE: Final[Mapping[str, Reason]] = {v: k for k, v in ERROR_CODE_OF_REASON.items()}


def reason_for_status(code: grpc.StatusCode) -> Reason:
    return REASON_FOR_STATUS.get(code, REASON_INTERNAL)


def reason_name(reason: Reason) -> str:
    """The name that goes into ErrorInfo.reason (``ERROR_REASON_MODEL_NOT_FOUND``)."""
    return common_pb2.ErrorReason.Name(reason)


def reason_from_name(name: str) -> Reason:
    """The ``ErrorReason`` named ``name``; ``REASON_UNSPECIFIED`` for a name this build does not know."""
    try:
        return cast("Reason", common_pb2.ErrorReason.Value(name))
    except ValueError:
        return REASON_UNSPECIFIED


def error_status(code: grpc.StatusCode, message: str, reason: Reason, *,
                 param: str | None = None) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error: its code and message, and one ErrorInfo detail (our domain, the
    reason's name, ``param`` in its metadata when there is one)."""
    info = error_details_pb2.ErrorInfo(reason=reason_name(reason), domain=ERROR_DOMAIN,
                                       metadata={PARAM_INFO_KEY: param} if param else {})
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    return status


def error_info(trailing: Metadata | None) -> error_details_pb2.ErrorInfo | None:
    """The inferplane ErrorInfo in a call's trailing metadata (``STATUS_DETAILS``), or None when there is none
    (or it cannot be read: a detail is an addition, never a reason to fail)."""
    raw = metadata_value(trailing, STATUS_DETAILS)
    if not isinstance(raw, bytes):
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except DecodeError:  # a garbled trailer is no detail
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None
