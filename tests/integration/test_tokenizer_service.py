"""The tokenizer service as a real grpc.aio server on an ephemeral port, built by ``build_server``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from inferplane.common.errors import PARAM_METADATA_KEY
from inferplane.common.server import GrpcServer, client_channel
from inferplane.common.settings import ServerSettings
from inferplane.tokenizer.main import SERVICE_NAME, TokenizerSettings, build_server
from inferplane.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

MODEL = "tiny-chat"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MULTIBYTE = "Grüße aus München! 日本語と中文 🙂🚀👍🏽 done."


def write_model(root: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Hello there, how are you?", "Grüße aus München!", "日本語 🙂"] * 3, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS,
        show_progress=False))
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokenizer-service")
    write_model(root / "models" / MODEL)
    catalog = root / "config" / "catalog.yaml"
    catalog.parent.mkdir()
    catalog.write_text(f"models:\n  - id: {MODEL}\n    triton_model: {MODEL}\n    tokenizer: ../models/{MODEL}\n")
    return catalog


@pytest_asyncio.fixture(scope="module")
async def server(catalog_file: Path) -> AsyncIterator[GrpcServer]:
    settings = TokenizerSettings(server=ServerSettings(port=0), catalog=catalog_file)
    srv = build_server(settings)
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture(scope="module")
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with client_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> tokenizer_pb2_grpc.TokenizerServiceStub:
    return tokenizer_pb2_grpc.TokenizerServiceStub(channel)


async def encode_text(stub: tokenizer_pb2_grpc.TokenizerServiceStub, text: str) -> list[int]:
    reply = await stub.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, text=text))
    return list(reply.token_ids)


async def test_encode_text_and_decode_round_trip(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    reply = await stub.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, text=MULTIBYTE))
    assert reply.rendered == MULTIBYTE
    assert len(reply.token_ids) > 10
    assert list(reply.stop_token_ids) == [0, 2]  # eos <|endoftext|>, then <|im_end|>
    decoded = await stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, token_ids=reply.token_ids))
    assert decoded.text == MULTIBYTE


async def test_encode_chat_renders_the_template(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    chat = tokenizer_pb2.ChatMessages(messages=[
        common_pb2.ChatMessage(role="system", content="Be brief."),
        common_pb2.ChatMessage(role="user", content="Grüße 🙂", name="ann"),
    ])
    reply = await stub.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, chat=chat))
    assert reply.rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrüße 🙂<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert reply.token_ids[0] == 1  # <|im_start|> is one special id
    kept = await stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, token_ids=reply.token_ids))
    assert kept.text == reply.rendered
    skipped = await stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, token_ids=reply.token_ids,
                                                            skip_special_tokens=True))
    assert "<|im_start|>" not in skipped.text and "Grüße 🙂" in skipped.text


async def test_decode_stream_yields_utf8_safe_deltas(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    ids = await encode_text(stub, MULTIBYTE)
    requests = [tokenizer_pb2.DecodeStreamRequest(model=MODEL, token_ids=ids[:1])]
    requests += [tokenizer_pb2.DecodeStreamRequest(token_ids=[i]) for i in ids[1:]]
    requests.append(tokenizer_pb2.DecodeStreamRequest(token_ids=[2], final=True))  # <|im_end|>, skipped
    call = stub.DecodeStream(iter(requests))
    deltas = [reply.text async for reply in call]
    assert len(deltas) == len(requests)  # one reply per message
    assert "" in deltas  # some characters needed several tokens
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE


async def test_decode_stream_final_flushes_an_incomplete_tail(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    ids = await encode_text(stub, "ok 🚀")
    call = stub.DecodeStream()
    await call.write(tokenizer_pb2.DecodeStreamRequest(model=MODEL, token_ids=ids[:-1]))
    first = await call.read()
    assert first.text.startswith("ok")  # the text before the rocket comes out; its bytes are held back
    assert "\ufffd" not in first.text
    await call.write(tokenizer_pb2.DecodeStreamRequest(final=True))
    last = await call.read()
    assert last.text.endswith("\ufffd")  # what decode(ids[:-1]) gives for the truncated character
    assert await call.read() == grpc.aio.EOF
    whole = await stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, token_ids=ids[:-1]))
    assert first.text + last.text == whole.text


async def test_unknown_model_is_not_found(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Encode(tokenizer_pb2.EncodeRequest(model="no-such-model", text="x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (err.value.details() or "")
    call = stub.DecodeStream(iter([tokenizer_pb2.DecodeStreamRequest(model="nope", token_ids=[1])]))
    with pytest.raises(grpc.aio.AioRpcError) as stream_err:
        async for _ in call:
            pass
    assert stream_err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_role_is_invalid_argument(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    chat = tokenizer_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="wizard", content="hi")])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, chat=chat))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "wizard" in (err.value.details() or "")
    assert (PARAM_METADATA_KEY, "messages[0].role") in tuple(err.value.trailing_metadata() or ())


@pytest.mark.parametrize("request_", [
    tokenizer_pb2.EncodeRequest(model=MODEL),  # neither text nor chat
    tokenizer_pb2.EncodeRequest(text="x"),  # no model
])
async def test_incomplete_encode_requests_are_invalid(stub: tokenizer_pb2_grpc.TokenizerServiceStub,
                                                      request_: tokenizer_pb2.EncodeRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Encode(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_out_of_vocabulary_ids_are_invalid(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, token_ids=[1, 10**9]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERPLANE_TOKENIZER_SERVER__PORT", "6000")
    monkeypatch.setenv("INFERPLANE_TOKENIZER_CATALOG", "/etc/catalog.yaml")
    settings = TokenizerSettings()
    assert settings.server.port == 6000
    assert settings.catalog == Path("/etc/catalog.yaml")
    assert TokenizerSettings.model_fields["server"].default.port == 50052


async def test_a_model_the_catalog_just_added_is_found_by_polling_it_at_once(catalog_file: Path,
                                                                          tmp_path: Path) -> None:
    """The router may know a new model before this service's next catalog poll: an unknown model makes the service
    poll at once (here a stand-in for the catalog watcher's poll_once, which adds the model) instead of answering
    NOT_FOUND; concurrent askers share one poll, and a model still unknown afterwards is NOT_FOUND."""
    from inferplane.tokenization.local import TokenizerRegistry

    write_model(tmp_path / "new-model")
    registry = TokenizerRegistry.from_catalog_file(catalog_file)
    polls = []

    async def poll_once() -> bool:
        polls.append(1)
        await asyncio.sleep(0.05)
        registry.set_paths({"just-added": tmp_path / "new-model"})
        return True

    srv = build_server(TokenizerSettings(server=ServerSettings(port=0), catalog=catalog_file), registry, poll_once)
    port = await srv.start()
    try:
        async with client_channel(f"127.0.0.1:{port}") as ch:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
            answers = await asyncio.gather(*(stub.Encode(tokenizer_pb2.EncodeRequest(model="just-added", text="Hello"))
                                             for _ in range(4)))
            assert all(a.token_ids for a in answers) and len(polls) == 1
            await asyncio.sleep(0.6)  # past the minimum interval between polls
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Encode(tokenizer_pb2.EncodeRequest(model="never-added", text="Hello"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(polls) == 2
    finally:
        await srv.stop(0)
