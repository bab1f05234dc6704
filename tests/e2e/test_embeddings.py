"""Embeddings end to end: the openai client → gateway → router → tokenizer (BERT WordPiece) → executor → Triton."""

from __future__ import annotations

import math

import httpx
import numpy as np
import openai
import pytest

from inferplane.cli.launcher import LocalStack
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e
MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def client(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=120)


def test_embeddings_are_unit_vectors_that_rank_meaning(client: openai.OpenAI) -> None:
    texts = ["A cat sits on the mat.", "A kitten is lying on the rug.", "Stock prices fell sharply today."]
    resp = client.embeddings.create(model=MODEL, input=texts)
    validate(resp.model_dump(exclude_unset=True), "CreateEmbeddingResponse")
    vecs = np.array([d.embedding for d in resp.data])
    assert vecs.shape == (3, 384) and [d.index for d in resp.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    sim = vecs @ vecs.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    # [CLS] and [SEP] around each text are counted, as the model consumed them
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 3 * 2


def test_single_string_and_base64_agree_with_floats(client: openai.OpenAI, stack: LocalStack, api_key: str) -> None:
    floats = client.embeddings.create(model=MODEL, input="hello world").data[0].embedding
    raw = httpx.post(f"{stack.base_url}/embeddings", headers={"Authorization": f"Bearer {api_key}"}, timeout=60,
                     json={"model": MODEL, "input": "hello world", "encoding_format": "base64"}).json()
    import base64

    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats, atol=1e-7)
    assert math.isclose(float(np.linalg.norm(decoded)), 1.0, abs_tol=1e-4)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL, "input": ["x"] * 2049}, "input"),
    ({"model": MODEL, "input": "word " * 600}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": "tiny-llama", "input": "hello"}, "model"),
])
def test_limits_are_400_before_any_work(stack: LocalStack, api_key: str, body: dict, param: str) -> None:
    resp = httpx.post(f"{stack.base_url}/embeddings", headers={"Authorization": f"Bearer {api_key}"}, json=body,
                      timeout=60)
    assert resp.status_code == 400, resp.text
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["param"] == param


def test_chat_on_an_embedding_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
