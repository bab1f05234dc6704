"""What the REST edge needs from the router, and the router over gRPC (``GrpcRouter``, the separate gateway).

The routes speak to a ``RouterApi``: open a generation (its first message, the initial metadata with the
rate-limit state, the further messages, a cancel), embed, list models, tokenize and detokenize, health. Every
failure comes out as the ``GatewayError`` that the router's status and ``ErrorInfo`` map to
(``from_rpc_error``). The other implementation runs in the router's own process and calls its servicer in the
same event loop (``inferplane.cli.edge``: the gateway imports no service).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from inferplane.common import wire
from inferplane.common.server import close_stream
from inferplane.gateway.errors import INTERNAL_MESSAGE, SERVER_ERROR, GatewayError, from_rpc_error
from inferplane.v1 import router_pb2, router_pb2_grpc

ROUTER_SERVICE = "inferplane.v1.RouterService"
Metadata = tuple[tuple[str, str], ...]


class GenerateCall(Protocol):
    """One ``Generate``: read ``first()``, then ``initial_metadata()``, then ``messages()``; ``close()`` always."""

    async def first(self) -> router_pb2.GenerateResponse:
        """The first message (``GatewayError`` when the call fails before it)."""

    async def initial_metadata(self) -> wire.Metadata:
        """The router's initial metadata (``x-ratelimit-*``, ``retry-after``), once the first message came."""

    def messages(self) -> AsyncGenerator[router_pb2.GenerateResponse]:
        """The messages after the first, until the call ends (``GatewayError`` when it fails)."""

    async def close(self) -> None:
        """Cancel the call unless it finished (the router cancels the executor and records usage)."""


class RouterApi(Protocol):
    def generate(self, request: router_pb2.GenerateRequest, *, metadata: Metadata) -> GenerateCall: ...

    async def embed(self, request: router_pb2.EmbedRequest, *, metadata: Metadata) -> router_pb2.EmbedResponse: ...

    async def list_models(self, *, metadata: Metadata) -> router_pb2.ListModelsResponse: ...

    async def tokenize(self, request: router_pb2.TokenizeRequest, *, metadata: Metadata
                       ) -> router_pb2.TokenizeResponse: ...

    async def detokenize(self, request: router_pb2.DetokenizeRequest, *, metadata: Metadata
                         ) -> router_pb2.DetokenizeResponse: ...

    async def count_tokens(self, request: router_pb2.CountTokensRequest, *,
                           metadata: Metadata) -> router_pb2.CountTokensResponse: ...

    async def kserve(self, method: str, request: Any, *, metadata: Metadata) -> Any:
        """The router's ``inference.GRPCInferenceService`` method ``method`` (the KServe v2 protocol, ``/v2``)."""

    async def serving(self) -> bool:
        """Whether the router reports SERVING (its health service's answer, or its own state in process)."""


class GrpcGenerateCall:
    """A ``Generate`` call over gRPC."""

    __slots__ = ("_call",)

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def first(self) -> router_pb2.GenerateResponse:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        if not isinstance(msg, router_pb2.GenerateResponse):  # EOF before any message
            raise GatewayError(500, INTERNAL_MESSAGE, type=SERVER_ERROR)
        return msg

    async def initial_metadata(self) -> wire.Metadata:
        return tuple(await self._call.initial_metadata() or ())

    async def messages(self) -> AsyncGenerator[router_pb2.GenerateResponse]:
        read = self._call.read
        while True:
            try:
                msg = await read()
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            if not isinstance(msg, router_pb2.GenerateResponse):
                return
            yield msg

    async def close(self) -> None:
        await close_stream(self._call)  # cancels unless finished; ends its client span


class GrpcRouter:
    """The router's ``RouterService`` and health service over one channel, each call with ``timeout_s``."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = router_pb2_grpc.RouterServiceStub(channel)
        self._kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._timeout_s = timeout_s

    def generate(self, request: router_pb2.GenerateRequest, *, metadata: Metadata) -> GrpcGenerateCall:
        return GrpcGenerateCall(self._stub.Generate(request, metadata=metadata, timeout=self._timeout_s))

    async def embed(self, request: router_pb2.EmbedRequest, *, metadata: Metadata) -> router_pb2.EmbedResponse:
        call = self._stub.Embed(request, metadata=metadata, timeout=self._timeout_s)
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def list_models(self, *, metadata: Metadata) -> router_pb2.ListModelsResponse:
        try:
            return await self._stub.ListModels(router_pb2.ListModelsRequest(), metadata=metadata,
                                               timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def tokenize(self, request: router_pb2.TokenizeRequest, *, metadata: Metadata
                       ) -> router_pb2.TokenizeResponse:
        try:
            return await self._stub.Tokenize(request, metadata=metadata, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def detokenize(self, request: router_pb2.DetokenizeRequest, *, metadata: Metadata
                         ) -> router_pb2.DetokenizeResponse:
        try:
            return await self._stub.Detokenize(request, metadata=metadata, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def count_tokens(self, request: router_pb2.CountTokensRequest, *,
                           metadata: Metadata) -> router_pb2.CountTokensResponse:
        try:
            return await self._stub.CountTokens(request, metadata=metadata, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def kserve(self, method: str, request: Any, *, metadata: Metadata) -> Any:
        call = getattr(self._kserve, method)(request, metadata=metadata, timeout=self._timeout_s)
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def serving(self) -> bool:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
