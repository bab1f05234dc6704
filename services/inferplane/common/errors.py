"""Domain errors, mapped once to gRPC status codes by ``ErrorInterceptor``.

Service code raises these plain exceptions and knows nothing of gRPC; the interceptor in
``inferplane.common.server`` turns each into a precise status (never a blanket INTERNAL).
"""

from __future__ import annotations

import grpc


class InferplaneError(Exception):
    """Base of all domain errors. ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(InferplaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(InferplaneError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(InferplaneError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(InferplaneError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(InferplaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(InferplaneError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(InferplaneError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(InferplaneError):
    code = grpc.StatusCode.FAILED_PRECONDITION


# Metadata key carrying the offending request parameter, so the gateway can fill OpenAI's "param".
PARAM_METADATA_KEY = "x-inferplane-param"
