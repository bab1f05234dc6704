"""``LocalTokenizer`` (the router's in-process tokenization) gives exactly what the tokenizer service's Encode gives.

The servicer is called in process here; ``tests/integration/test_tokenization_grpc.py`` compares the two
implementations of the interface through a real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inferplane.assets import TINY_LLAMA as ASSET_TINY_LLAMA
from inferplane.common.errors import InvalidArgument, NotFound
from inferplane.tokenization import LocalTokenizer, TokenizerBundle, TokenizerRegistry
from inferplane.tokenizer.service import TokenizerServicer
from inferplane.v1 import common_pb2, tokenizer_pb2

ROOT = Path(__file__).resolve().parents[2]
TINY = ASSET_TINY_LLAMA
CHATS = [
    [common_pb2.ChatMessage(role="user", content="Return the value of x")],
    [common_pb2.ChatMessage(role="system", content="Be brief."),
     common_pb2.ChatMessage(role="user", content="héllo — ünïcode ✓ 🎉", name="ann"),
     common_pb2.ChatMessage(role="assistant", content="Hi."),
     common_pb2.ChatMessage(role="user", content="")],
]
TEXTS = ["", "Return the", "def f(x):\n    return x  # 🎉", "a " * 300]


@pytest.fixture(scope="module")
def both() -> tuple[LocalTokenizer, TokenizerServicer]:
    service = TokenizerServicer(TokenizerRegistry(bundles={"tiny-llama": TokenizerBundle.from_dir(TINY,
                                                                                                  name="tiny-llama")}))
    return LocalTokenizer(TokenizerRegistry({"tiny-llama": TINY})), service


async def test_text_and_chat_encode_the_same_in_process(both: tuple[LocalTokenizer, TokenizerServicer]) -> None:
    local, service = both
    for text in TEXTS:
        remote = await service.Encode(tokenizer_pb2.EncodeRequest(model="tiny-llama", text=text), None)  # type: ignore[arg-type]
        mine = await local.encode_text("tiny-llama", text, timeout=None)
        assert (mine.token_ids, mine.stop_token_ids) == (list(remote.token_ids), list(remote.stop_token_ids))
    for chat in CHATS:
        req = tokenizer_pb2.EncodeRequest(model="tiny-llama", chat=tokenizer_pb2.ChatMessages(messages=chat))
        remote = await service.Encode(req, None)  # type: ignore[arg-type]
        mine = await local.encode_chat("tiny-llama", chat, timeout=None)
        assert mine.token_ids == list(remote.token_ids) and len(mine.token_ids) > 3
    batch = await local.encode_batch("tiny-llama", TEXTS[1:], add_special_tokens=False, timeout=None)
    assert batch == [(await local.encode_text("tiny-llama", t, timeout=None)).token_ids for t in TEXTS[1:]]


async def test_bad_chat_is_refused_in_process(both: tuple[LocalTokenizer, TokenizerServicer]) -> None:
    local, _ = both
    with pytest.raises(InvalidArgument):
        await local.encode_chat("tiny-llama", [common_pb2.ChatMessage(role="wizard", content="x")], timeout=None)


def test_registry_loads_each_model_on_first_use_and_refuses_unknown_ones() -> None:
    registry = TokenizerRegistry({"tiny-llama": TINY, "broken": ROOT / "no-such-folder"})
    assert registry.model_ids == ["tiny-llama", "broken"]
    bundle = registry.get("tiny-llama")
    assert registry.get("tiny-llama") is bundle  # loaded once
    with pytest.raises(NotFound) as err:
        registry.get("gpt-9")
    assert err.value.param == "model" and "tiny-llama" in err.value.message
    with pytest.raises(InvalidArgument):
        registry.get("")
    with pytest.raises(FileNotFoundError):
        registry.load_all()  # the tokenizer service loads every folder at start: a bad one fails there


async def test_local_decoder_streams_the_text_of_the_ids(both: tuple[LocalTokenizer, TokenizerServicer]) -> None:
    local, _ = both
    text = "def f(x):\n    return x  # 🎉 ünïcode"
    ids = (await local.encode_text("tiny-llama", text, timeout=None)).token_ids
    decoder = local.decoder("tiny-llama", timeout=None)
    deltas = [await decoder.push(ids[i:i + 2]) for i in range(0, len(ids), 2)]
    deltas.append(await decoder.push([], final=True))
    await decoder.close()
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == local.registry.get("tiny-llama").decode(ids) == text
