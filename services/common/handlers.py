"""Rewrapping a gRPC method handler's behaviour, for server interceptors that handle all four RPC shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap_handler(handler: grpc.RpcMethodHandler, *, unary: Wrap, stream: Wrap) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: ``unary`` for single responses, ``stream`` for streams."""
    shapes = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, stream),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, stream),
    }
    attr, make, wrap = shapes[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(getattr(handler, attr)), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
