"""The executor's pass-through of Triton's ``inference.GRPCInferenceService``, for the router's raw ``infer`` models.

The router never needs Triton's address: it sends ``ModelInfer`` (and the metadata and readiness calls) to the
executor, which forwards the request's bytes on its own Triton channel and the answer's bytes back, parsing
neither (no deserializer on either side). Triton's status and message come back as they are (the error
interceptor passes a downstream status through). Only the calls the router makes are forwarded: model control,
shared memory, statistics, trace and log settings stay unreachable, even from inside the mesh.
"""

from __future__ import annotations

import grpc
from opentelemetry import propagate

SERVICE = "inference.GRPCInferenceService"
FORWARDED = ("ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady", "ServerLive", "ServerReady")


def passthrough(triton: grpc.aio.Channel) -> grpc.GenericRpcHandler:
    """A handler that forwards ``FORWARDED`` calls to ``triton``, with the caller's deadline and trace context
    (Triton joins the request's trace from the ``traceparent`` metadata)."""

    def forward(method: str) -> grpc.RpcMethodHandler:
        call = triton.unary_unary(f"/{SERVICE}/{method}", None, None)  # no (de)serializer: bytes in, bytes out

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            response: bytes = await call(request, timeout=context.time_remaining(),
                                         metadata=tuple(carrier.items()) or None)
            return response

        return grpc.unary_unary_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(SERVICE, {method: forward(method) for method in FORWARDED})
