"""Any Triton model at the edge: the KServe v2 / Open Inference Protocol (``inference.GRPCInferenceService``).

``tritonclient.grpc`` speaks to the router as it would to Triton. Every call needs the key (``authorization:
Bearer``), as every other public call does. A model is a catalog model with the task ``infer``: its public id maps
to its ``triton_model``, which the request is rewritten to and the answer rewritten from, so Triton's names and
addresses never reach the caller. ``ModelInfer`` is admitted as a generation with no tokens (scope, rate limits,
budget, the model's queue), forwarded to an executor replica (the executor passes it on to its Triton,
``inferplane.executor.kserve``) and leaves exactly one usage record when its answer came back, priced per
request (the catalog's ``prices.per_request``). A failed inference gives its reservation back and is not billed,
as a failed embedding is. ``ModelMetadata``, ``ModelConfig`` and ``ModelReady`` ask an executor and are free.
The rest of Triton's service (model control, shared memory, statistics, trace and log settings, streaming) is
refused with UNIMPLEMENTED: it would let a caller act on Triton itself.
"""

from __future__ import annotations

import time
import weakref
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferplane.common import wire
from inferplane.common.catalog import CatalogModel
from inferplane.common.errors import InvalidArgument, NotFound, PermissionDenied, Unimplemented
from inferplane.common.server import caller_key
from inferplane.common.wire import STOP
from inferplane.router import canary
from inferplane.router.auth import KeyVerifier
from inferplane.router.clients import KeyInfo
from inferplane.router.engine import GenerationEngine
from inferplane.router.lease import trace_request
from inferplane.router.replicas import Replica
from inferplane.router.service import request_id_from

SERVICE = "inference.GRPCInferenceService"
INFER_TASK = "infer"
# Only a replica that cannot be reached is at fault: a raw model's INTERNAL or UNKNOWN is its answer to this
# request (a bad tensor, an exception in model.py), and must not eject a healthy replica or be retried.
INFER_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE})
# Parameters that name memory on Triton's machine: meaningless to a remote caller, and a way to read another
# client's region. Refused wherever they appear.
SHARED_MEMORY_PARAMETERS = frozenset({"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"})
EXTENSIONS = ("binary_tensor_data", "parameters", "classification", "model_configuration")


def _version() -> str:
    try:
        return version("inferplane")
    except PackageNotFoundError:
        return "0"


def infer_model(engine: GenerationEngine, name: str) -> CatalogModel:
    """The catalog model ``name`` if it is served through this protocol; ``NotFound`` otherwise."""
    model = engine.model(name)
    if INFER_TASK not in model.tasks:
        raise NotFound(f"The model `{model.id}` is not served through the inference protocol (its tasks: "
                       f"{', '.join(model.tasks)}); use the /v1 API for it.", param="model",
                       reason=wire.REASON_MODEL_NOT_FOUND)
    return model


def may_use(key: KeyInfo, model: CatalogModel) -> None:
    """What admission checks first, for the calls that are not admitted (metadata, readiness)."""
    if "inference" not in key.scopes:
        raise PermissionDenied("This API key lacks the 'inference' scope (an admin key cannot run models).")
    if not key.may_use(model.id):
        raise PermissionDenied(f"This API key may not use the model `{model.id}`.", param="model")


def check_infer_request(req: service_pb2.ModelInferRequest) -> None:
    """Refuse what cannot cross the edge: shared memory, and raw contents that do not match the inputs."""
    for where, params in [("parameters", req.parameters),
                          *((f"inputs[{i}].parameters", t.parameters) for i, t in enumerate(req.inputs)),
                          *((f"outputs[{i}].parameters", t.parameters) for i, t in enumerate(req.outputs))]:
        found = SHARED_MEMORY_PARAMETERS.intersection(params)
        if found:
            raise InvalidArgument(f"'{where}': shared memory ({sorted(found)[0]}) is not available through "
                                  "inferplane's edge; send the tensor's data.", param=where)
    if not req.inputs:
        raise InvalidArgument("'inputs' must name at least one input tensor.", param="inputs")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidArgument(f"'raw_input_contents' has {len(req.raw_input_contents)} entries for "
                              f"{len(req.inputs)} inputs: give one per input, in order.", param="raw_input_contents")


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on the router: thin edges over ``infer`` and the executors."""

    def __init__(self, engine: GenerationEngine, keys: KeyVerifier) -> None:
        self._engine = engine
        self._keys = keys
        # one stub per replica (its channel): built once, not per call
        self._stubs: weakref.WeakKeyDictionary[Replica, service_pb2_grpc.GRPCInferenceServiceStub] = (
            weakref.WeakKeyDictionary())

    def _stub(self, replica: Replica) -> service_pb2_grpc.GRPCInferenceServiceStub:
        stub = self._stubs.get(replica)
        if stub is None:
            stub = self._stubs[replica] = service_pb2_grpc.GRPCInferenceServiceStub(replica.channel)
        return stub

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[KeyInfo, str, float | None]:
        """The verified key, the request id (also sent back as trailing metadata) and the monotonic deadline."""
        metadata = context.invocation_metadata()
        request_id = request_id_from(metadata)
        context.set_trailing_metadata(((wire.REQUEST_ID, request_id),))
        key = await self._keys.verify(caller_key(metadata))
        remaining = context.time_remaining()
        return key, request_id, (time.monotonic() + remaining if remaining is not None else None)

    async def _ask(self, model: CatalogModel, method: str, request: Any, request_id: str,
                   deadline: float | None) -> Any:
        """A free call (metadata, readiness) on a replica serving ``model``, retried as any other."""
        timeout = self._engine.clock(model, deadline).left()

        async def start(replica: Replica) -> Any:
            return await getattr(self._stub(replica), method)(request, timeout=timeout,
                                                               metadata=((wire.REQUEST_ID, request_id),))

        async with self._engine.executors.open(model.triton_model, start, request_id=request_id,
                                               faults=INFER_FAULTS) as resp:
            return resp

    # --- the server --------------------------------------------------------------------------------------

    async def ServerLive(self, request: service_pb2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ServerLiveResponse:
        await self._caller(context)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: service_pb2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.ServerReadyResponse:
        """Ready when every ``infer`` model has a replica that may take it now."""
        await self._caller(context)
        executors = self._engine.executors
        models = [m for m in self._engine.catalog.models if INFER_TASK in m.tasks]
        return service_pb2.ServerReadyResponse(ready=all(executors.serving_count(m.triton_model) for m in models))

    async def ServerMetadata(self, request: service_pb2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> service_pb2.ServerMetadataResponse:
        await self._caller(context)
        return service_pb2.ServerMetadataResponse(name="inferplane", version=_version(), extensions=EXTENSIONS)

    # --- a model -----------------------------------------------------------------------------------------

    async def ModelReady(self, request: service_pb2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelReadyResponse:
        key, request_id, deadline = await self._caller(context)
        model = infer_model(self._engine, request.name)
        may_use(key, model)
        if not self._engine.executors.serving_count(model.triton_model):
            return service_pb2.ModelReadyResponse(ready=False)
        ask = service_pb2.ModelReadyRequest(name=model.triton_model, version=request.version)
        resp: service_pb2.ModelReadyResponse = await self._ask(model, "ModelReady", ask, request_id, deadline)
        return resp

    async def ModelMetadata(self, request: service_pb2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> service_pb2.ModelMetadataResponse:
        key, request_id, deadline = await self._caller(context)
        model = infer_model(self._engine, request.name)
        may_use(key, model)
        ask = service_pb2.ModelMetadataRequest(name=model.triton_model, version=request.version)
        resp: service_pb2.ModelMetadataResponse = await self._ask(model, "ModelMetadata", ask, request_id, deadline)
        resp.name = model.id
        return resp

    async def ModelConfig(self, request: service_pb2.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.ModelConfigResponse:
        """Triton's config under the public name, without its ``parameters`` (paths on the executor's disk)."""
        key, request_id, deadline = await self._caller(context)
        model = infer_model(self._engine, request.name)
        may_use(key, model)
        ask = service_pb2.ModelConfigRequest(name=model.triton_model, version=request.version)
        resp: service_pb2.ModelConfigResponse = await self._ask(model, "ModelConfig", ask, request_id, deadline)
        resp.config.name = model.id
        resp.config.ClearField("parameters")
        return resp

    async def ModelInfer(self, request: service_pb2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse:
        key, request_id, deadline = await self._caller(context)
        return await self.infer(request, key=key, request_id=request_id, deadline=deadline)

    async def infer(self, request: service_pb2.ModelInferRequest, *, key: KeyInfo, request_id: str,
                    deadline: float | None) -> service_pb2.ModelInferResponse:
        """One inference: the lease (admission, queue slot, one usage record once answered) around one call."""
        engine = self._engine
        model = canary.serving(infer_model(engine, request.model_name), request_id)  # a canary split's version
        check_infer_request(request)
        clock = engine.clock(model, deadline)
        trace_request(INFER_TASK, model.id, request_id, key)
        request.model_name = model.triton_model

        async def start(replica: Replica) -> service_pb2.ModelInferResponse:  # the whole unary call may be retried
            resp: service_pb2.ModelInferResponse = await self._stub(replica).ModelInfer(
                request, timeout=clock.left(), metadata=((wire.REQUEST_ID, request_id),))
            return resp

        # No usage record unless the answer came back: a failed inference gives its reservation back.
        async with engine.admit(key, model, request_id=request_id, operation=INFER_TASK, clock=clock,
                                prompt_tokens=0, max_tokens=0) as lease:
            async with engine.executors.open(model.triton_model, start, request_id=request_id,
                                             faults=INFER_FAULTS) as resp:
                lease.finished(STOP)
        resp.model_name = model.id
        return resp

# --- the rest of Triton's service: refused ---------------------------------------------------------------

def _refuse(method: str) -> Any:
    message = f"{SERVICE}/{method} is not offered through inferplane's edge."
    if method == "ModelStreamInfer":
        async def stream(self: KServeServicer, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            raise Unimplemented(message)
            yield  # a generator: the method streams its responses

        return stream

    async def unary(self: KServeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(message)

    return unary


# The generated base class answers every other method itself, with a status that the error interceptor would
# turn into INTERNAL: each is refused here with UNIMPLEMENTED.
REFUSED = sorted(name for name in vars(service_pb2_grpc.GRPCInferenceServiceServicer)
                 if not name.startswith("_") and name not in vars(KServeServicer))
for _name in REFUSED:
    setattr(KServeServicer, _name, _refuse(_name))
