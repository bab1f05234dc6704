"""What a gRPC user does first at the public port, as ``grpcurl list`` / ``describe`` and a health probe do it:
server reflection through ``grpcio-reflection``'s ``ProtoReflectionDescriptorDatabase``, and
``grpc.health.v1.Health/Check``. Shared by the edge's integration test and the e2e test through the real stack."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

# Imported so that the internal services are in this process's default descriptor pool, as they are in the
# router's: a server that reflected from the default pool would describe them, and the check below would see it.
from inferplane.v1 import executor_pb2, metering_pb2, tokenizer_pb2  # noqa: F401

ROUTER_SERVICE = "inferplane.v1.RouterService"
# the KServe v2 protocol's service is public too (tritonclient.grpc; grpcurl describes ModelInfer)
KSERVE_SERVICE = "inference.GRPCInferenceService"
PUBLIC_SERVICES = {ROUTER_SERVICE, KSERVE_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
INTERNAL_SYMBOLS = ("inferplane.v1.TokenizerService", "inferplane.v1.ExecutorService",
                    "inferplane.v1.MeteringService", "inferplane.v1.EncodeRequest")


@dataclass
class Discovered:
    services: set[str]
    router_methods: dict[str, tuple[str, str, bool]]  # name -> (input type, output type, server streaming)
    kserve_methods: set[str]
    internal_found: list[str]  # internal symbols reflection would describe (must stay empty)
    health: int  # HealthCheckResponse.ServingStatus of the whole server ("")
    router_health: int  # ... of inferplane.v1.RouterService


def discover(address: str, *, timeout: float = 30.0) -> Discovered:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        pool = DescriptorPool(db)
        router = pool.FindServiceByName(ROUTER_SERVICE)
        methods = {m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming)
                   for m in router.methods}
        kserve = {m.name for m in pool.FindServiceByName(KSERVE_SERVICE).methods}
        internal = []
        for symbol in INTERNAL_SYMBOLS:
            try:
                db.FindFileContainingSymbol(symbol)
            except KeyError:
                continue
            internal.append(symbol)
        health = health_pb2_grpc.HealthStub(channel)
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status
        own = health.Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE), timeout=timeout).status
    return Discovered(services, methods, kserve, internal, overall, own)


def assert_public_api_discovered(found: Discovered) -> None:
    assert found.services == PUBLIC_SERVICES, found.services
    assert found.router_methods["Generate"] == ("inferplane.v1.GenerateRequest", "inferplane.v1.GenerateResponse",
                                                True)
    assert {"Generate", "Embed", "ListModels", "Tokenize", "Detokenize"} <= set(found.router_methods)
    assert {"ModelInfer", "ModelMetadata", "ServerLive"} <= found.kserve_methods
    assert found.internal_found == [], found.internal_found
    assert found.health == found.router_health == health_pb2.HealthCheckResponse.SERVING
