"""The router's key cache: fresh hits, verdicts never cached, and stale-if-error while metering is down."""

from __future__ import annotations

import time

import grpc
import pytest

from inferplane.common.errors import Unauthenticated
from inferplane.router.auth import KeyVerifier
from inferplane.router.clients import KeyInfo


class Rpc(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class FakeMetering:
    """Stands in for metering's VerifyKey: the test is about the cache's logic, not metering."""

    def __init__(self) -> None:
        self.calls = 0
        self.down: grpc.StatusCode | None = None
        self.known = {"sk-good": KeyInfo("k1", "one")}

    async def verify_key(self, api_key: str, *, timeout: float) -> KeyInfo:
        self.calls += 1
        if self.down is not None:
            raise Rpc(self.down)
        if api_key not in self.known:
            raise Rpc(grpc.StatusCode.UNAUTHENTICATED)
        return self.known[api_key]


async def test_a_key_seen_recently_keeps_working_while_metering_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    metering = FakeMetering()
    verifier = KeyVerifier(metering, ttl=30.0, stale_ttl=600.0)  # type: ignore[arg-type]
    assert (await verifier.verify("sk-good")).key_id == "k1"
    await verifier.verify("sk-good")
    assert metering.calls == 1  # fresh hit
    clock = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: clock + 60)  # past the fresh TTL, within the stale one
    metering.down = grpc.StatusCode.UNAVAILABLE
    assert (await verifier.verify("sk-good")).key_id == "k1"
    assert metering.calls == 2  # metering was asked first
    with pytest.raises(grpc.aio.AioRpcError):  # a key never seen is not admitted unverified
        await verifier.verify("sk-other")
    monkeypatch.setattr(time, "monotonic", lambda: clock + 700)  # past the stale TTL too
    with pytest.raises(grpc.aio.AioRpcError):
        await verifier.verify("sk-good")


async def test_a_verdict_from_metering_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    metering = FakeMetering()
    verifier = KeyVerifier(metering, ttl=30.0, stale_ttl=600.0)  # type: ignore[arg-type]
    await verifier.verify("sk-good")
    clock = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: clock + 60)
    del metering.known["sk-good"]  # revoked
    with pytest.raises(Unauthenticated):
        await verifier.verify("sk-good")
    metering.down = grpc.StatusCode.UNAVAILABLE  # and the revocation is not forgotten when metering goes down
    with pytest.raises(grpc.aio.AioRpcError):
        await verifier.verify("sk-good")
    # other failures (a bug in metering, not an outage) do not fall back to the cache either
    metering.known["sk-good"] = KeyInfo("k1", "one")
    metering.down = None
    await verifier.verify("sk-good")
    monkeypatch.setattr(time, "monotonic", lambda: clock + 120)
    metering.down = grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.aio.AioRpcError):
        await verifier.verify("sk-good")


async def test_without_a_stale_window_an_outage_refuses() -> None:
    metering = FakeMetering()
    verifier = KeyVerifier(metering, ttl=0.0, stale_ttl=0.0)  # type: ignore[arg-type]
    await verifier.verify("sk-good")
    metering.down = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await verifier.verify("sk-good")
