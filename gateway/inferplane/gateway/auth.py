"""The caller's API key at the REST edge: ``Authorization: Bearer KEY`` in, gRPC metadata out, and a 401 before
any call when there is no key or an ill-formed one (the rules and texts are ``inferplane.common.wire``'s)."""

from __future__ import annotations

from collections.abc import Mapping

from inferplane.common import wire
from inferplane.gateway.errors import unauthenticated


def key_metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The caller's key as ``authorization`` metadata for the router or metering; ``GatewayError`` 401 without
    one (OpenAI's missing-key text and a null code; an ill-formed header is an invalid key)."""
    value = headers.get(wire.AUTHORIZATION)
    key = wire.parse_bearer(value)
    if key is None:
        message = wire.key_refusal(value)
        raise unauthenticated(message, code=None if message == wire.MISSING_KEY else "invalid_api_key")
    return wire.bearer_metadata(key)
