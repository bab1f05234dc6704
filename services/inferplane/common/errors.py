"""Domain errors, mapped once to gRPC statuses by ``ErrorInterceptor``.

Service code raises these plain exceptions and knows nothing of gRPC; the interceptor in
``inferplane.common.server`` turns each into a precise status (never a blanket INTERNAL) with a typed
``google.rpc.ErrorInfo`` detail: the error's ``reason`` (an ``ErrorReason`` of ``common.proto``) and its
``param``.

Each class has a default reason (its status's, from ``wire.REASON_FOR_STATUS``); a raise that knows better
says so: ``raise NotFound("...", param="model", reason=wire.REASON_MODEL_NOT_FOUND)``.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

from inferplane.common import wire

# Metadata key carrying the offending request parameter, so the gateway can fill OpenAI's "param".
PARAM_METADATA_KEY = wire.PARAM
Metadata = tuple[tuple[str, str], ...]


class InferplaneError(Exception):
    """Base of all domain errors. ``code`` is the gRPC status it maps to, ``reason`` the ErrorInfo reason,
    ``param`` the offending request field, ``metadata`` what else goes out as trailing metadata (e.g.
    ``retry-after``, ``x-ratelimit-*``)."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None, reason: wire.Reason | None = None,
                 metadata: Metadata = ()) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.metadata = metadata
        self._reason = reason

    @property
    def reason(self) -> wire.Reason:
        """The reason given at the raise, else the class's default (read when the error is sent: subclasses may
        set ``metadata`` after ``__init__``)."""
        return self._reason if self._reason is not None else self.default_reason()

    @reason.setter
    def reason(self, value: wire.Reason) -> None:
        self._reason = value

    def default_reason(self) -> wire.Reason:
        return wire.reason_for_status(self.code)


class InvalidArgument(InferplaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(InferplaneError):
    code = grpc.StatusCode.NOT_FOUND

    def default_reason(self) -> wire.Reason:
        # What was not found is what ``param`` names: a model, or something else (an API key id, a budget).
        return wire.REASON_MODEL_NOT_FOUND if self.param == "model" else wire.REASON_NOT_FOUND


class Unauthenticated(InferplaneError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(InferplaneError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(InferplaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def default_reason(self) -> wire.Reason:
        # A raise that names its refusal only by the older error-code trailer (``x-inferplane-error-code:
        # insufficient_quota``) still gets its reason; anything else exhausted is a rate limit.
        code = next((v for k, v in self.metadata if k == wire.ERROR_CODE), None)
        return wire.REASON_OF_ERROR_CODE.get(code or "", wire.REASON_RATE_LIMITED)


class Unavailable(InferplaneError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(InferplaneError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(InferplaneError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(InferplaneError):
    code = grpc.StatusCode.UNIMPLEMENTED
