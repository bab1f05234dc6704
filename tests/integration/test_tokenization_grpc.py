"""The two ``Tokenizer`` implementations agree: ``GrpcTokenizer`` against a real tokenizer service on a free port,
``LocalTokenizer`` in process, over the shipped catalog (tiny-llama's byte-level BPE with its chat template,
all-MiniLM-L6-v2's WordPiece). Same ids, same stop ids, same text deltas, same errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from inferplane.assets import CATALOG
from inferplane.common.errors import InvalidArgument, NotFound
from inferplane.common.server import client_channel
from inferplane.common.settings import ServerSettings
from inferplane.tokenization import GrpcTokenizer, LocalTokenizer, Tokenizer, TokenizerRegistry
from inferplane.tokenizer.main import TokenizerSettings, build_server
from inferplane.v1 import common_pb2

LLAMA, MINILM = "tiny-llama", "all-minilm-l6-v2"
TEXTS = ["", "Return the value of x", "def f(x):\n    return x  # 🎉 ünïcode ✓", "Grüße 日本語 🙂🚀👍🏽", "a " * 300]
CHATS = [
    [common_pb2.ChatMessage(role="user", content="Return the value of x")],
    [common_pb2.ChatMessage(role="system", content="Be brief."),
     common_pb2.ChatMessage(role="user", content="héllo — ünïcode ✓ 🎉", name="ann"),
     common_pb2.ChatMessage(role="assistant", content="Hi."),
     common_pb2.ChatMessage(role="user", content="")],
]


@pytest_asyncio.fixture(scope="module")
async def remote() -> AsyncIterator[GrpcTokenizer]:
    server = build_server(TokenizerSettings(server=ServerSettings(port=0), catalog=CATALOG))
    await server.start()
    try:
        async with client_channel(f"127.0.0.1:{server.port}") as channel:
            yield GrpcTokenizer(channel)
    finally:
        await server.stop(0)


@pytest.fixture(scope="module")
def local() -> LocalTokenizer:
    return LocalTokenizer(TokenizerRegistry.from_catalog_file(CATALOG))


async def stream(tokenizer: Tokenizer, model: str, ids: list[int], step: int) -> list[str]:
    """The deltas of ``ids`` pushed ``step`` at a time, then the final push."""
    decoder = tokenizer.decoder(model, timeout=10.0)
    try:
        deltas = [await decoder.push(ids[i:i + step]) for i in range(0, len(ids), step)]
        deltas.append(await decoder.push([], final=True))
    finally:
        await decoder.close()
    return deltas


@pytest.mark.parametrize("model", [LLAMA, MINILM])
async def test_text_encodes_the_same(remote: GrpcTokenizer, local: LocalTokenizer, model: str) -> None:
    for text in TEXTS:
        assert await remote.encode_text(model, text, timeout=10.0) == await local.encode_text(model, text,
                                                                                              timeout=None)
    assert (await local.encode_text(LLAMA, "x", timeout=None)).stop_token_ids == [1, 6]  # eos, <|end|>


async def test_chat_encodes_the_same(remote: GrpcTokenizer, local: LocalTokenizer) -> None:
    for chat in CHATS:
        mine = await local.encode_chat(LLAMA, chat, timeout=None)
        assert await remote.encode_chat(LLAMA, chat, timeout=10.0) == mine
        assert len(mine.token_ids) > len(chat) * 2  # the template's markers came along


@pytest.mark.parametrize("add_special_tokens", [False, True])
async def test_batches_encode_the_same(remote: GrpcTokenizer, local: LocalTokenizer, add_special_tokens: bool) -> None:
    texts = TEXTS[1:]
    mine = await local.encode_batch(MINILM, texts, add_special_tokens=add_special_tokens, timeout=None)
    assert await remote.encode_batch(MINILM, texts, add_special_tokens=add_special_tokens, timeout=10.0) == mine
    assert all((ids[0] == 101) == add_special_tokens for ids in mine)  # [CLS] only when asked for


@pytest.mark.parametrize("step", [1, 3, 1000])
async def test_streamed_text_is_the_same(remote: GrpcTokenizer, local: LocalTokenizer, step: int) -> None:
    for text in TEXTS:
        ids = [*(await local.encode_text(LLAMA, text, timeout=None)).token_ids, 6]  # <|end|>: special, dropped
        mine = await stream(local, LLAMA, ids, step)
        assert await stream(remote, LLAMA, ids, step) == mine
        assert "".join(mine) == text
        assert not any("\ufffd" in delta for delta in mine)
    ids = (await local.encode_text(LLAMA, TEXTS[3], timeout=None)).token_ids
    assert "" in await stream(remote, LLAMA, ids, 1)  # an emoji spans several ids: its first ones complete nothing


async def test_one_call_decode_is_the_same_and_keeps_special_tokens(remote: GrpcTokenizer,
                                                                      local: LocalTokenizer) -> None:
    for text in TEXTS:
        ids = [*(await local.encode_text(LLAMA, text, timeout=None)).token_ids, 6]  # <|end|>: special, kept
        mine = await local.decode(LLAMA, ids, timeout=None)
        assert await remote.decode(LLAMA, ids, timeout=10.0) == mine == text + "<|end|>"
    for tokenizer in (local, remote):
        with pytest.raises(InvalidArgument) as outside:
            await tokenizer.decode(LLAMA, [10**9], timeout=10.0)
        assert outside.value.param == "token_ids"
        with pytest.raises(NotFound):
            await tokenizer.decode("no-such-model", [1], timeout=10.0)


async def test_refusals_are_the_same_domain_errors(remote: GrpcTokenizer, local: LocalTokenizer) -> None:
    bad_chat = [common_pb2.ChatMessage(role="wizard", content="hi")]
    for tokenizer in (local, remote):
        with pytest.raises(InvalidArgument) as bad:
            await tokenizer.encode_chat(LLAMA, bad_chat, timeout=10.0)
        assert bad.value.param == "messages[0].role" and "wizard" in bad.value.message
        with pytest.raises(InvalidArgument) as no_template:
            await tokenizer.encode_chat(MINILM, CHATS[0], timeout=10.0)
        assert no_template.value.param == "messages"
        with pytest.raises(NotFound) as unknown:
            await tokenizer.encode_text("no-such-model", "x", timeout=10.0)
        assert unknown.value.param == "model" and "no-such-model" in unknown.value.message
        with pytest.raises(NotFound):
            await tokenizer.encode_batch("no-such-model", ["x"], add_special_tokens=False, timeout=10.0)
        with pytest.raises(NotFound):
            await stream(tokenizer, "no-such-model", [1, 2], 1)


async def test_an_unreachable_service_is_a_grpc_error_not_a_refusal() -> None:
    async with client_channel("127.0.0.1:1") as channel:  # nothing listens on port 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await GrpcTokenizer(channel).encode_text(LLAMA, "x", timeout=5.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
