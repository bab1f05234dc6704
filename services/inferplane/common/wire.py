"""The wire contracts every process shares, defined once: metadata keys, bearer parsing, the request-id rule,
finish reasons and error codes.

Nothing here imports a service; services, the gateway and the CLI import from here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Final

from inferplane.v1 import common_pb2

# --- metadata keys (gRPC metadata and the matching HTTP headers) -------------------------------------------

AUTHORIZATION: Final = "authorization"
REQUEST_ID: Final = "x-request-id"
# The machine-readable reason of a refusal beside its status (e.g. ``insufficient_quota``, ``overloaded``);
# kept for callers that read trailers, alongside the typed ``google.rpc.ErrorInfo`` detail.
ERROR_CODE: Final = "x-inferplane-error-code"
RETRY_AFTER: Final = "retry-after"

# --- bearer keys -------------------------------------------------------------------------------------------

MISSING_KEY: Final = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                      "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
MALFORMED_KEY: Final = "The Authorization header must be 'Bearer YOUR_KEY'."
INCORRECT_KEY: Final = "Incorrect API key provided."


def parse_bearer(value: str | bytes | None) -> str | None:
    """The key in an ``Authorization`` value (``Bearer KEY``, scheme case-insensitive), or None when there is
    no value, another scheme, or an empty key."""
    if value is None:
        return None
    text = (value.decode(errors="replace") if isinstance(value, bytes) else value).strip()
    scheme, _, token = text.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    """The first value of ``key`` (case-insensitive) in gRPC metadata, or None."""
    for name, value in metadata or ():
        if name.lower() == key:
            return value
    return None


def bearer_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer key in gRPC metadata, or None (missing or malformed)."""
    return parse_bearer(metadata_value(metadata, AUTHORIZATION))


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries ``key``."""
    return ((AUTHORIZATION, f"Bearer {key}"),)


# --- request ids -------------------------------------------------------------------------------------------

MAX_REQUEST_ID_LENGTH: Final = 128
# What gRPC metadata can carry and what the ledger accepts: 1-128 printable ASCII characters, no space.
_REQUEST_ID_RE = re.compile(r"[!-~]{1,128}")
BAD_REQUEST_ID: Final = "x-request-id must be 1-128 printable ASCII characters without spaces"


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID_RE.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


# --- finish reasons ----------------------------------------------------------------------------------------

# The names a generation ends with, everywhere below the edge (the ledger stores them as these strings). The
# protobuf enum ``common_pb2.FinishReason`` carries them between processes; OpenAI's names are the same words.
STOP: Final = "stop"
LENGTH: Final = "length"
CANCELLED: Final = "cancelled"
ERROR: Final = "error"
FINISH_REASONS: Final = (STOP, LENGTH, CANCELLED, ERROR)
FINISH_TO_PB: Final = {STOP: common_pb2.FINISH_REASON_STOP, LENGTH: common_pb2.FINISH_REASON_LENGTH,
                       CANCELLED: common_pb2.FINISH_REASON_CANCELLED, ERROR: common_pb2.FINISH_REASON_ERROR}
FINISH_FROM_PB: Final = {v: k for k, v in FINISH_TO_PB.items()}

# --- error codes (the values of ERROR_CODE) ----------------------------------------------------------------

INSUFFICIENT_QUOTA: Final = "insufficient_quota"
OVERLOADED: Final = "overloaded"
