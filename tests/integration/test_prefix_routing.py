"""Cache-aware routing through the real services: two executors, each on its own real Triton serving tiny-llama with
its own prefix cache, and a router with ``routing_policy: cache_aware``. Eight system prompts, each sent once and
then by two other users: every later prompt goes to the replica whose cache holds its system prompt, so the model
reuses the whole system prompt each time (``cached_tokens`` from the model itself, not from the router); which the
router's index predicted exactly, so the router names blocks with the model's own hash. The index is precise: each
executor reports what its model's cache gains and loses, and the router's view equals the executor's, evictions
caused by another router's requests included."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from inferplane.common.settings import ServerSettings
from inferplane.executor.main import Executor
from inferplane.metering.main import seed_catalog
from inferplane.router.main import Router
from inferplane.router.prefix_index import Prefix
from inferplane.router.settings import RouterSettings
from inferplane.v1 import router_pb2, router_pb2_grpc
from tests.integration.test_admission import Metering, metering  # noqa: F401  (fixture)
from tests.integration.test_edge_modes import database_url  # noqa: F401  (fixture: SQLite)
from tests.integration.triton_stack import eventually, executor_settings

pytestmark = pytest.mark.triton
MODEL = "tiny-llama"


@pytest_asyncio.fixture
async def executors(metering: Metering, tmp_path: Path) -> AsyncIterator[list[Executor]]:  # noqa: F811
    seed_catalog(metering.store, CATALOG)
    all_ = [Executor(executor_settings(tmp_path / f"executor-{i}")) for i in range(2)]
    started: list[Executor] = []
    try:
        for executor in all_:
            await executor.start()
            started.append(executor)
        yield all_
    finally:
        for executor in started:
            await executor.stop(0)


def start_router(metering: Metering, executors: list[Executor], outbox: Path) -> Router:  # noqa: F811
    return Router(RouterSettings(server=ServerSettings(port=0, grace_seconds=0),
                                 metering_addr=f"127.0.0.1:{metering.server.port}",
                                 executor_addrs=[f"127.0.0.1:{e.server.port}" for e in executors],
                                 outbox_path=outbox, request_timeout_s=60, routing_policy="cache_aware"))


@pytest_asyncio.fixture
async def router(metering: Metering, executors: list[Executor], tmp_path: Path) -> AsyncIterator[Router]:  # noqa: F811
    r = start_router(metering, executors, tmp_path / "outbox.db")
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def words(rng: random.Random, n: int) -> str:
    vocabulary = ["return", "the", "path", "of", "a", "file", "list", "joined", "with", "value", "string", "object",
                  "if", "is", "not", "given", "default", "name", "new", "each", "in", "order", "to", "be"]
    return " ".join(rng.choice(vocabulary) for _ in range(n))


async def test_prompts_go_where_their_system_prompt_is_cached_and_the_model_reuses_it(
        router: Router, metering: Metering, executors: list[Executor], tmp_path: Path) -> None:  # noqa: F811
    replicas = router.engine.executors

    async def ready() -> bool:
        return len(replicas.replicas) == 2 and all(r.reported and MODEL in r.models for r in replicas.replicas.values())

    await eventually(ready, 60, "both executors report tiny-llama")
    _, key = metering.store.create_key("app")
    model = load_catalog(CATALOG).get(MODEL)
    assert model is not None and model.prefix_cache_blocks > 0
    rng = random.Random(7)
    systems = [words(rng, 90) for _ in range(8)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.server.port}") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def generate(prompt: str, stub: router_pb2_grpc.RouterServiceStub = stub) -> tuple[int, int]:
            last = None
            async for msg in stub.Generate(router_pb2.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=2,
                                                                      include_usage=True),
                                           metadata=[("authorization", f"Bearer {key}")], timeout=60):
                last = msg
            assert last is not None and last.HasField("usage")
            return last.usage.prompt_tokens, last.usage.cached_tokens

        async def predicted_then_served(prompt: str) -> tuple[int, int]:
            """(cached tokens the router's index predicts, cached tokens the model reports): equal, or a test fails."""
            encoded = await router.engine.tokenizer.encode_text(MODEL, prompt, timeout=10)
            hashes = Prefix.of(encoded.token_ids, block_size=model.prefix_block_size,
                               capacity=model.prefix_cache_blocks).hashes
            predicted = max(replicas.index.matched(MODEL, r, hashes) for r in replicas.replicas)
            prompt_tokens, cached = await generate(prompt)
            reusable = (prompt_tokens - 1) // model.prefix_block_size  # the model computes the last token
            assert cached == model.prefix_block_size * min(predicted, reusable), (prompt[:40], predicted, cached)
            return predicted, cached

        async def same_view(index_of: Router) -> bool:
            """Every replica reports (precise), and the router's view of its blocks is the executor's."""
            return all(index_of.engine.executors.index.reported(MODEL, f"127.0.0.1:{e.server.port}")
                       == e.blocks.held(MODEL) for e in executors)

        for user in range(3):
            for i, system in enumerate(systems):
                prompt = f"{system}\nUser {user}: {words(rng, 8)}"
                _, cached = await predicted_then_served(prompt)
                if user == 0:
                    assert cached == 0  # a new system prompt: nothing cached anywhere
                else:
                    # the whole system prompt (its full blocks, up to where the user's text starts) was reused
                    alone = await router.engine.tokenizer.encode_text(MODEL, system, timeout=10)
                    system_tokens = len(alone.token_ids)
                    assert cached >= model.prefix_block_size * (system_tokens // model.prefix_block_size - 1), \
                        (user, i, cached, system_tokens)
        # the index holds the blocks of the 8 system prompts (and the users' own), within both replicas' budgets
        assert 0 < len(replicas.index) <= 2 * model.prefix_cache_blocks
        await eventually(lambda: same_view(router), 10, "the router's view of each replica equals the executor's")
        assert replicas.index.approximate_blocks() == 0 and replicas.index.precise_blocks() == len(replicas.index)

        # Another router's traffic evicts: 40 new long prompts (~25 blocks each, twice both budgets). This router
        # sees the evictions from the executors' reports, and still predicts exactly what the model reuses.
        other = start_router(metering, executors, tmp_path / "other-outbox.db")
        await other.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{other.server.port}") as other_channel:
                other_stub = router_pb2_grpc.RouterServiceStub(other_channel)
                for _ in range(40):
                    await generate(words(rng, 360), other_stub)
        finally:
            await other.stop(0)
        await eventually(lambda: same_view(router), 10, "the evictions reached this router")
        evicted = 0
        for system in systems:
            predicted, _ = await predicted_then_served(f"{system}\nUser 9: {words(rng, 8)}")
            evicted += predicted == 0
        assert evicted > 0, "the other router's prompts evicted some system prompts (else this proves nothing)"
