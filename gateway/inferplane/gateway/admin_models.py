"""Admin REST routes of the model catalog: ``/admin/models`` (list, create), ``/admin/models/{id}`` (change,
delete), with an admin key. Thin, as ``admin.py``: a body becomes a metering request, the answer becomes JSON.
Routers pick a change up within their poll period (docs/catalog.md).

    POST /admin/models  {"id": "my-finetune", "triton_model": "tiny-llama",
                         "price": {"input_per_million": "0.20", "output_per_million": "0.80"}}
    PATCH /admin/models/my-finetune  {"versions": {"2": "tiny-llama-v2"}, "traffic": {"1": 90, "2": 10}}
    POST /admin/models/my-finetune/promote  {"version": 2}
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferplane.gateway.errors import GatewayError
from inferplane.v1 import metering_pb2

Call = Callable[[Request, str, Any], Awaitable[Any]]


class ModelPriceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_per_million: str = "0"
    output_per_million: str = "0"
    per_request: str = "0"
    cached_input_per_million: str | None = None  # prompt tokens reused from the prefix cache; absent: the input price


class CreateModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    # The Triton model serving version 1 (shorthand for versions {"1": triton_model}).
    triton_model: str | None = None
    # Version number -> Triton model name.
    versions: dict[int, str] = Field(default_factory=dict)
    # The version to serve (default: the highest).
    version: int | None = Field(None, ge=1)
    # catalog.yaml's other keys (tasks, tokenizer, context_length, owned_by, ...); left out: copied from the model
    # already served by the same Triton model.
    settings: dict[str, Any] = Field(default_factory=dict)
    price: ModelPriceBody | None = None
    # Canary split from the start: version -> percent (see UpdateModelBody); left out: all to ``version``.
    traffic: dict[int, Any] | None = None

    @model_validator(mode="after")
    def _one_source_of_versions(self) -> CreateModelBody:
        if self.triton_model is not None and self.versions:
            raise ValueError("give 'triton_model' or 'versions', not both")
        if self.triton_model is None and not self.versions:
            raise ValueError("'triton_model' (or 'versions') is required")
        return self


class UpdateModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Settings to change (null: back to the default).
    settings: dict[str, Any] = Field(default_factory=dict)
    versions: dict[int, str] = Field(default_factory=dict)
    remove_versions: list[int] = Field(default_factory=list)
    version: int | None = Field(None, ge=1)
    price: ModelPriceBody | None = None
    # Canary split: version -> percent (non-negative integers summing to 100; metering checks them against the
    # versions); null: no split, every request to the served version.
    traffic: dict[int, Any] | None = None


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The version to serve with all the traffic.
    version: int = Field(ge=1)


def model_dict(m: metering_pb2.CatalogModel, price_dict: Callable[[metering_pb2.Price], dict[str, Any]],
               iso: Callable[[Any], str | None]) -> dict[str, Any]:
    settings = json.loads(m.spec_json or "{}")
    traffic = settings.pop("traffic", None) or {str(m.version): 100}  # no split: all to the served version
    return {"id": m.id, "object": "model", "triton_model": m.versions.get(m.version), "version": m.version,
            "versions": {str(k): v for k, v in sorted(m.versions.items())}, "traffic": traffic, "settings": settings,
            "price": price_dict(m.price) if m.HasField("price") else None, "source": m.source,
            "created_at": iso(m.created_at), "updated_at": iso(m.updated_at)}


def add_model_routes(router: APIRouter, call: Call, *, parse: Callable[[Request, type[BaseModel]], Awaitable[Any]],
                     require_admin: Callable[[Request], Awaitable[None]],
                     nanos: Callable[[str, str], int], price_dict: Callable[[metering_pb2.Price], dict[str, Any]],
                     iso: Callable[[Any], str | None]) -> None:
    """Add the catalog routes to ``router`` (``admin.py``'s helpers passed in: one way to call metering)."""

    def amounts(body: ModelPriceBody) -> metering_pb2.PriceAmounts:
        return metering_pb2.PriceAmounts(
            input_per_million_nanodollars=nanos(body.input_per_million, "price.input_per_million"),
            output_per_million_nanodollars=nanos(body.output_per_million, "price.output_per_million"),
            per_request_nanodollars=nanos(body.per_request, "price.per_request"),
            cached_input_per_million_nanodollars=None if body.cached_input_per_million is None
            else nanos(body.cached_input_per_million, "price.cached_input_per_million"))

    def changed(resp: metering_pb2.ModelChange, status: int = 200, **extra: Any) -> Response:
        return JSONResponse({**model_dict(resp.model, price_dict, iso), "catalog_version": resp.catalog_version,
                             **extra}, status_code=status)

    @router.get("/admin/models")
    async def list_models(request: Request) -> Response:
        await require_admin(request)  # the catalog's listing is mesh-internal in metering: guard it here
        resp = await call(request, "ListCatalog", metering_pb2.ListCatalogRequest())
        return JSONResponse({"object": "list", "catalog_version": resp.version,
                             "data": [model_dict(m, price_dict, iso) for m in resp.models]})

    @router.post("/admin/models")
    async def create_model(request: Request) -> Response:
        body: CreateModelBody = await parse(request, CreateModelBody)
        settings = {**body.settings, **({"traffic": body.traffic} if body.traffic is not None else {})}
        req = metering_pb2.CreateModelRequest(id=body.id, spec_json=json.dumps(settings),
                                              versions=body.versions or {1: body.triton_model or ""},
                                              version=body.version or 0)
        if body.price is not None:
            req.price.CopyFrom(amounts(body.price))
        return changed(await call(request, "CreateModel", req), 201)

    @router.post("/admin/models/{model:path}/promote")
    async def promote_model(request: Request, model: str) -> Response:
        """All traffic to one version, served from now on (a canary's end; a rollback promotes the one before)."""
        body: PromoteBody = await parse(request, PromoteBody)
        req = metering_pb2.UpdateModelRequest(id=model, spec_json=json.dumps({"traffic": None}), version=body.version)
        return changed(await call(request, "UpdateModel", req))

    @router.patch("/admin/models/{model:path}")
    async def update_model(request: Request, model: str) -> Response:
        body: UpdateModelBody = await parse(request, UpdateModelBody)
        settings = {**body.settings, **({"traffic": body.traffic} if "traffic" in body.model_fields_set else {})}
        req = metering_pb2.UpdateModelRequest(id=model, spec_json=json.dumps(settings) if settings else "",
                                              versions=body.versions, remove_versions=body.remove_versions,
                                              version=body.version)
        if body.price is not None:
            req.price.CopyFrom(amounts(body.price))
        return changed(await call(request, "UpdateModel", req))

    @router.delete("/admin/models/{model:path}")
    async def delete_model(request: Request, model: str) -> Response:
        if not model:
            raise GatewayError(404, f"Invalid URL ({request.method} {request.url.path})")
        return changed(await call(request, "DeleteModel", metering_pb2.DeleteModelRequest(id=model)), deleted=True)
