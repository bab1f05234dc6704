"""The router's ``tokenize`` / ``detokenize`` settings pick where each half of tokenization runs."""

from __future__ import annotations

import grpc
import pytest

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from inferplane.router.main import RouterSettings, build_tokenizer
from inferplane.tokenization import GrpcTokenizer, LocalTokenizer, SplitTokenizer
from inferplane.tokenization.local import LocalDecoder
from inferplane.tokenization.remote import StreamingDecoder

# Nothing listens there: a call that leaves the process fails with UNAVAILABLE.
NOWHERE = "127.0.0.1:1"


def settings(tokenize: str, detokenize: str) -> RouterSettings:
    return RouterSettings(tokenize=tokenize, detokenize=detokenize, tokenizer_addr=NOWHERE)  # type: ignore[arg-type]


async def test_local_by_default_opens_no_channel() -> None:
    assert (RouterSettings.model_fields["tokenize"].default, RouterSettings.model_fields["detokenize"].default) \
        == ("local", "local")
    tokenizer, channel = build_tokenizer(settings("local", "local"), load_catalog(CATALOG))
    assert isinstance(tokenizer, LocalTokenizer) and channel is None
    assert (await tokenizer.encode_text("tiny-llama", "Return the", timeout=1.0)).token_ids


async def test_remote_for_both_is_the_grpc_client() -> None:
    tokenizer, channel = build_tokenizer(settings("remote", "remote"), load_catalog(CATALOG))
    assert isinstance(tokenizer, GrpcTokenizer) and channel is not None
    with pytest.raises(grpc.aio.AioRpcError):
        await tokenizer.encode_text("tiny-llama", "Return the", timeout=1.0)
    await channel.close(None)


async def test_local_encode_with_remote_decode() -> None:
    tokenizer, channel = build_tokenizer(settings("local", "remote"), load_catalog(CATALOG))
    assert isinstance(tokenizer, SplitTokenizer) and channel is not None
    assert (await tokenizer.encode_text("tiny-llama", "Return the", timeout=1.0)).token_ids  # no hop
    assert await tokenizer.encode_batch("all-minilm-l6-v2", ["a b"], add_special_tokens=True, timeout=1.0)
    decoder = tokenizer.decoder("tiny-llama", timeout=1.0)
    assert isinstance(decoder, StreamingDecoder)
    await decoder.close()
    await channel.close(None)


async def test_remote_encode_with_local_decode() -> None:
    tokenizer, channel = build_tokenizer(settings("remote", "local"), load_catalog(CATALOG))
    assert isinstance(tokenizer, SplitTokenizer) and channel is not None
    with pytest.raises(grpc.aio.AioRpcError):
        await tokenizer.encode_text("tiny-llama", "Return the", timeout=1.0)
    with pytest.raises(grpc.aio.AioRpcError):
        await tokenizer.encode_batch("all-minilm-l6-v2", ["a b"], add_special_tokens=True, timeout=1.0)
    decoder = tokenizer.decoder("tiny-llama", timeout=1.0)
    assert isinstance(decoder, LocalDecoder)
    assert await decoder.push([], final=True) == ""
    await channel.close(None)
