"""``/v2``: the KServe v2 / Open Inference Protocol over HTTP, for ``tritonclient.http`` and any KServe client.

Each route is the router's ``inference.GRPCInferenceService`` call of the same name (``RouterApi.kserve``): the
key, admission, the per-request price and the usage record are the router's (``inferplane.router.kserve``). The
bodies are converted in ``kserve_protocol`` (Triton's binary tensor data extension included). Errors are the
protocol's own shape, ``{"error": "<message>"}``, with the status the rest of the API gives (401, 404, 429...).
Every route needs the key, the health routes too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from inferplane.common import wire
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.errors import GatewayError
from inferplane.gateway.kserve_protocol import HEADER_LENGTH, infer_call, infer_response, metadata_body
from inferplane.gateway.upstream import RouterApi

T = TypeVar("T")
Guard = Callable[[Request, Awaitable[Any]], Awaitable[Any]]
Route = Callable[[Request], Awaitable[Response]]


def _error(err: GatewayError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def kserve_router(guard: Guard) -> APIRouter:
    """The ``/v2`` routes. ``guard(request, work)`` awaits the router call and cancels it when the caller leaves."""

    async def call(request: Request, method: str, message: Any) -> Any:
        metadata = (*key_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))
        router: RouterApi = request.app.state.router
        return await guard(request, router.kserve(method, message, metadata=metadata))

    def route(handler: Route) -> Route:
        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except GatewayError as err:
                return _error(err)

        answer.__name__ = handler.__name__
        return answer

    async def infer(request: Request) -> Response:
        encoding = request.headers.get("content-encoding", "identity")
        if encoding != "identity":
            raise GatewayError(400, f"Content-Encoding '{encoding}' is not supported: send the body uncompressed.")
        parsed = infer_call(await request.body(), request.headers.get(HEADER_LENGTH),
                            model=request.path_params["name"], version=request.path_params.get("version", ""))
        resp: service_pb2.ModelInferResponse = await call(request, "ModelInfer", parsed.request)
        body, header_length = infer_response(resp, parsed)
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    async def model_metadata(request: Request) -> Response:
        resp = await call(request, "ModelMetadata", service_pb2.ModelMetadataRequest(
            name=request.path_params["name"], version=request.path_params.get("version", "")))
        return JSONResponse(metadata_body(resp))

    async def model_config(request: Request) -> Response:
        resp = await call(request, "ModelConfig", service_pb2.ModelConfigRequest(
            name=request.path_params["name"], version=request.path_params.get("version", "")))
        return JSONResponse(json_format.MessageToDict(resp.config, preserving_proto_field_name=True))

    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        resp = await call(request, "ModelReady", service_pb2.ModelReadyRequest(
            name=name, version=request.path_params.get("version", "")))
        return Response(status_code=200) if resp.ready else _error(GatewayError(400, f"Model '{name}' is not ready."))

    async def server_live(request: Request) -> Response:
        resp = await call(request, "ServerLive", service_pb2.ServerLiveRequest())
        return Response(status_code=200) if resp.live else _error(GatewayError(400, "The server is not live."))

    async def server_ready(request: Request) -> Response:
        resp = await call(request, "ServerReady", service_pb2.ServerReadyRequest())
        return Response(status_code=200) if resp.ready else _error(GatewayError(400, "The server is not ready."))

    async def server_metadata(request: Request) -> Response:
        resp = await call(request, "ServerMetadata", service_pb2.ServerMetadataRequest())
        return JSONResponse({"name": resp.name, "version": resp.version, "extensions": list(resp.extensions)})

    api = APIRouter()
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        api.add_api_route(f"{prefix}/infer", route(infer), methods=["POST"])
        api.add_api_route(prefix, route(model_metadata), methods=["GET"])
        api.add_api_route(f"{prefix}/config", route(model_config), methods=["GET"])
        api.add_api_route(f"{prefix}/ready", route(model_ready), methods=["GET"])
    api.add_api_route("/v2/health/live", route(server_live), methods=["GET"])
    api.add_api_route("/v2/health/ready", route(server_ready), methods=["GET"])
    api.add_api_route("/v2", route(server_metadata), methods=["GET"])
    return api
