"""The metering service as a real grpc.aio server on loopback, and the metering CLI on the same files."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferplane.common.errors import PARAM_METADATA_KEY
from inferplane.common.server import GrpcServer
from inferplane.common.settings import ServerSettings, load_settings
from inferplane.metering.cli import register
from inferplane.metering.main import SERVICE_NAME, MeteringSettings, build_server, open_store
from inferplane.metering.store import BAD_KEY_MESSAGE, MeteringStore
from inferplane.v1 import metering_pb2, metering_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "inferplane.yaml"
    path.write_text(yaml.safe_dump({"metering": {
        "server": {"host": "127.0.0.1", "port": 0},
        "database_url": f"sqlite:///{tmp_path / 'state' / 'metering.db'}",
        "secret_file": str(tmp_path / "state" / "metering-secret"),
    }}))
    return path


@pytest.fixture
def settings(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> MeteringSettings:
    for name in list(os.environ):
        if name.startswith("INFERPLANE_METERING_"):
            monkeypatch.delenv(name)
    return load_settings(MeteringSettings, config_file=config_file, section="metering")


@pytest.fixture
def store(settings: MeteringSettings) -> Iterator[MeteringStore]:
    s = open_store(settings)
    yield s
    s.close()


@pytest.fixture
async def server(settings: MeteringSettings, store: MeteringStore) -> AsyncIterator[GrpcServer]:
    srv = build_server(settings, store=store)
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> metering_pb2_grpc.MeteringServiceStub:
    return metering_pb2_grpc.MeteringServiceStub(channel)


def record(request_id: str, **kw: object) -> metering_pb2.UsageRecord:
    fields: dict[str, object] = dict(request_id=request_id, key_id="abcdefghijkl", model="tiny-llama",
                                     prompt_tokens=11, completion_tokens=3, finish_reason="stop", latency_ms=25)
    fields.update(kw)
    return metering_pb2.UsageRecord(**fields)  # type: ignore[arg-type]


# ---- gRPC ----------------------------------------------------------------------------------------


async def test_health_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_verify_key(stub: metering_pb2_grpc.MeteringServiceStub, store: MeteringStore) -> None:
    info, plain = store.create_key("svc")
    reply = await stub.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=plain), timeout=5)
    assert (reply.key_id, reply.name) == (info.key_id, "svc")

    for bad in (plain[:-1] + ("x" if plain[-1] != "x" else "y"), "sk-ip-garbage", ""):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=bad), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == BAD_KEY_MESSAGE
        assert info.key_id not in (err.value.details() or "")

    store.revoke_key(info.key_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=plain), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_record_usage_is_idempotent(stub: metering_pb2_grpc.MeteringServiceStub, store: MeteringStore) -> None:
    first = record("req-svc-1", prompt_tokens=11, time_to_first_token_ms=4)
    first.created_at.FromDatetime(datetime(2025, 12, 1, 12, 0, tzinfo=UTC))
    assert (await stub.RecordUsage(metering_pb2.RecordUsageRequest(record=first), timeout=5)).created is True
    again = record("req-svc-1", prompt_tokens=500)
    assert (await stub.RecordUsage(metering_pb2.RecordUsageRequest(record=again), timeout=5)).created is False
    # Concurrent repeats over the wire: still one record.
    replies = await asyncio.gather(*[
        stub.RecordUsage(metering_pb2.RecordUsageRequest(record=record("req-svc-2")), timeout=10) for _ in range(6)
    ])
    assert sorted(r.created for r in replies) == [False] * 5 + [True]
    assert store.count_usage() == 2
    [row] = [r for r in store.list_usage() if r.request_id == "req-svc-1"]
    assert row.prompt_tokens == 11 and row.time_to_first_token_ms == 4
    assert row.created_at == datetime(2025, 12, 1, 12, 0, tzinfo=UTC)


async def test_list_usage(stub: metering_pb2_grpc.MeteringServiceStub, store: MeteringStore) -> None:
    admin = (("authorization", f"Bearer {store.create_key('ops', scopes=['admin'])[1]}"),)
    for i, key in enumerate(["keyAAAAAAAAA", "keyBBBBBBBBB", "keyAAAAAAAAA"]):
        rec = record(f"list-{i}", key_id=key)
        rec.created_at.FromDatetime(datetime(2025, 12, 1, 12, 0, i, tzinfo=UTC))
        await stub.RecordUsage(metering_pb2.RecordUsageRequest(record=rec), timeout=5)
    everything = await stub.ListUsage(metering_pb2.ListUsageRequest(), metadata=admin, timeout=5)
    assert [r.request_id for r in everything.records] == ["list-2", "list-1", "list-0"]
    assert not everything.records[0].HasField("time_to_first_token_ms")
    assert everything.records[0].created_at.ToDatetime(tzinfo=UTC) == datetime(2025, 12, 1, 12, 0, 2, tzinfo=UTC)
    only_a = await stub.ListUsage(metering_pb2.ListUsageRequest(key_id="keyAAAAAAAAA", limit=1), metadata=admin,
                                  timeout=5)
    assert [r.request_id for r in only_a.records] == ["list-2"]


@pytest.mark.parametrize(("request_", "param"), [
    (metering_pb2.RecordUsageRequest(), "record"),
    (metering_pb2.RecordUsageRequest(record=record("")), "request_id"),
    (metering_pb2.RecordUsageRequest(record=record("neg", prompt_tokens=-1)), "prompt_tokens"),
    (metering_pb2.RecordUsageRequest(record=record("neg", completion_tokens=-5)), "completion_tokens"),
    (metering_pb2.RecordUsageRequest(record=record("neg", time_to_first_token_ms=-1)), "time_to_first_token_ms"),
    (metering_pb2.RecordUsageRequest(record=record("nomodel", model="")), "model"),
    (metering_pb2.ListUsageRequest(limit=-1), "limit"),
    (metering_pb2.ListUsageRequest(limit=1001), "limit"),
])
async def test_invalid_argument(stub: metering_pb2_grpc.MeteringServiceStub, store: MeteringStore, request_: object,
                                param: str) -> None:
    call = stub.RecordUsage if isinstance(request_, metering_pb2.RecordUsageRequest) else stub.ListUsage
    key = (("authorization", f"Bearer {store.create_key('caller')[1]}"),)  # ListUsage authenticates first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request_, metadata=key, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (PARAM_METADATA_KEY, param) in tuple(err.value.trailing_metadata() or ())


# ---- CLI -----------------------------------------------------------------------------------------


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="inferplane")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


async def test_cli_created_key_verifies_over_grpc_and_is_never_listed(
    config_file: Path, settings: MeteringSettings, stub: metering_pb2_grpc.MeteringServiceStub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli("keys", "create", "--name", "from-cli", "--config", str(config_file)) == 0
    out, err = capsys.readouterr()
    plain = out.strip()
    assert plain.startswith("sk-ip-") and "\n" not in plain
    key_id = plain[len("sk-ip-"):len("sk-ip-") + 12]
    assert key_id in err and plain not in err

    reply = await stub.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=plain), timeout=5)
    assert (reply.key_id, reply.name) == (key_id, "from-cli")

    assert cli("keys", "list", "--config", str(config_file)) == 0
    out, err = capsys.readouterr()
    assert key_id in out and "from-cli" in out
    assert plain not in out + err and plain.removeprefix(f"sk-ip-{key_id}-") not in out + err

    assert cli("keys", "revoke", key_id, "--config", str(config_file)) == 0
    capsys.readouterr()
    with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
        await stub.VerifyKey(metering_pb2.VerifyKeyRequest(api_key=plain), timeout=5)
    assert rpc_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cli("keys", "revoke", "nosuchkey000", "--config", str(config_file)) == 1


async def test_cli_usage(config_file: Path, stub: metering_pb2_grpc.MeteringServiceStub,
                         capsys: pytest.CaptureFixture[str]) -> None:
    import json

    for i in range(3):
        await stub.RecordUsage(metering_pb2.RecordUsageRequest(record=record(f"cli-{i}")), timeout=5)
    assert cli("usage", "--json", "--limit", "2", "--config", str(config_file)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and {"request_id", "key_id", "prompt_tokens", "created_at"} <= set(rows[0])
    assert cli("usage", "--key-id", "abcdefghijkl", "--config", str(config_file)) == 0
    table = capsys.readouterr().out
    assert table.startswith("CREATED") and all(f"cli-{i}" in table for i in range(3))
    assert cli("usage", "--limit", "0", "--config", str(config_file)) == 2


# ---- entry point ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_python_m_serves_then_drains_on_sigterm(config_file: Path, settings: MeteringSettings) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERPLANE_METERING_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferplane.metering", "--config", str(config_file), "--port", str(port),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30,
                                       wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, output.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERPLANE_METERING_DATABASE_URL", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("INFERPLANE_METERING_SECRET", "from-env")
    monkeypatch.setenv("INFERPLANE_METERING_SERVER__PORT", "6001")
    s = load_settings(MeteringSettings)
    assert s.database_url.endswith("env.db") and s.server.port == 6001
    assert s.secret is not None and s.secret.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INFERPLANE_METERING_"):
            monkeypatch.delenv(name)
    s = MeteringSettings()
    assert s.server == ServerSettings(port=50054) and s.secret is None
    assert s.database_url == "sqlite:///.inferplane/metering.db"
