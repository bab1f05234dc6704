"""IncrementalDecoder: UTF-8-safe deltas whose concatenation is exactly the full decode."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from inferplane.assets import CATALOG
from inferplane.common.errors import InvalidArgument
from inferplane.tokenization import TokenizerRegistry
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.tokenization.detok import REPLACEMENT_CHAR, IncrementalDecoder

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Grüße aus München! Ça va très bien, don't stop.",
    "日本語のテキストも少し。中文也有一点。한국어도 조금.",
    "Emoji time 🙂🚀👍🏽 and a 👨‍👩‍👧 family.",
    "The quick brown fox jumps over the lazy dog.",
] * 3
# Characters of 1 to 4 UTF-8 bytes, a ZWJ sequence and a skin-tone modifier among them.
CHAR_POOL = [*"abc xyz,.", *"éüßç", *"日本語中文", *"한국", "🙂", "🚀", "👍🏽", "👨‍👩‍👧", "\n"]
SPECIALS = ["<s>", "</s>", "<|im_end|>"]


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A GPT-2-style byte-level BPE, small enough that most non-ASCII characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    """A BERT-style WordPiece (MiniLM's kind): "##" continuations, spaces between words, [CLS]/[SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    return tok


@pytest.fixture(scope="module")
def llama_sp() -> Tokenizer:
    """A Llama-style SentencePiece BPE: Metaspace, byte fallback <0x..> tokens, leading space stripped."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(CORPUS[:2] + CORPUS[4:5], trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, unk_token="<unk>")
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(spec))


def random_chunks(rng: random.Random, ids: list[int], most: int = 3) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        k = rng.randint(1, most)
        chunks.append(ids[i:i + k])
        i += k
    return chunks


def stream(tok: Tokenizer | TokenizerBundle, chunks: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens)
    return [*(decoder.push(c) for c in chunks), decoder.flush()]


def random_text(rng: random.Random, most: int = 24) -> str:
    return "".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(0, most)))


def test_test_tokenizer_really_splits_characters(byte_bpe: Tokenizer) -> None:
    # The property tests below mean something only if characters do span several tokens.
    ids = byte_bpe.encode("日本 🙂").ids
    assert any(REPLACEMENT_CHAR in byte_bpe.decode([i]) for i in ids)


def test_split_character_comes_out_whole_where_it_completes(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("🚀").ids
    assert len(ids) > 1, "the emoji should need several byte tokens"
    decoder = IncrementalDecoder(byte_bpe)
    deltas = [decoder.push([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🚀"
    assert decoder.flush() == ""


@pytest.mark.parametrize("seed", range(3))
def test_deltas_of_text_never_hold_a_broken_character(byte_bpe: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        text = random_text(rng)
        ids = byte_bpe.encode(text).ids
        deltas = stream(byte_bpe, random_chunks(rng, ids))
        assert "".join(deltas) == byte_bpe.decode(ids) == text
        assert not any(REPLACEMENT_CHAR in d for d in deltas), (text, deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_of_random_ids_concatenate_to_the_full_decode(byte_bpe: Tokenizer, skip_special_tokens: bool) -> None:
    # Random ids make invalid UTF-8 (stray continuation bytes, truncated characters) and special tokens.
    rng = random.Random(1234)
    vocab = byte_bpe.get_vocab_size()
    for _ in range(600):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        deltas = stream(byte_bpe, random_chunks(rng, ids), skip_special_tokens)
        assert "".join(deltas) == byte_bpe.decode(ids, skip_special_tokens=skip_special_tokens), ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_wordpiece_spacing_survives_streaming(wordpiece: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(7)
    vocab = wordpiece.get_vocab_size()
    for _ in range(400):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 20))]
        deltas = stream(wordpiece, random_chunks(rng, ids), skip_special_tokens)
        assert "".join(deltas) == wordpiece.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_llama_style_byte_fallback_and_leading_space(llama_sp: Tokenizer) -> None:
    rng = random.Random(3)
    assert "<0xF0>" in [llama_sp.id_to_token(i) for i in llama_sp.encode("🙂").ids]
    for _ in range(300):
        text = random_text(rng)
        ids = llama_sp.encode(text).ids
        deltas = stream(llama_sp, random_chunks(rng, ids))
        assert "".join(deltas) == llama_sp.decode(ids)
        assert not any(REPLACEMENT_CHAR in d for d in deltas), (text, deltas)


def test_flush_releases_an_incomplete_character_as_the_full_decode_does(byte_bpe: Tokenizer) -> None:
    lead = byte_bpe.encode("🙂").ids[0]  # the first byte(s) of a 4-byte character alone
    decoder = IncrementalDecoder(byte_bpe)
    assert decoder.push(byte_bpe.encode("ok ").ids) == "ok "
    assert decoder.push([lead]) == ""
    assert decoder.flush() == byte_bpe.decode([lead]) == REPLACEMENT_CHAR


def test_window_stays_small_over_a_long_stream(byte_bpe: Tokenizer) -> None:
    text = "".join(random.Random(5).choice(CHAR_POOL) for _ in range(2000))
    ids = byte_bpe.encode(text).ids
    decoder = IncrementalDecoder(byte_bpe)
    out, widest = [], 0
    for i in ids:
        out.append(decoder.push([i]))
        widest = max(widest, decoder.window_size)
    out.append(decoder.flush())
    assert "".join(out) == text
    assert decoder.token_count == len(ids)
    # Per push the decoder re-reads only the last emitted piece and the held-back tail, not the stream.
    assert widest <= 12, widest


def test_empty_pushes_and_special_only_pushes(byte_bpe: Tokenizer) -> None:
    decoder = IncrementalDecoder(byte_bpe, skip_special_tokens=True)
    eos = byte_bpe.token_to_id("</s>")
    assert decoder.push([]) == ""
    assert decoder.push([eos]) == ""
    assert decoder.push(byte_bpe.encode("hi").ids) == "hi"
    assert decoder.flush() == ""
    assert decoder.flush() == ""
    kept = IncrementalDecoder(byte_bpe, skip_special_tokens=False)
    assert kept.push([eos]) == "</s>"


@pytest.fixture(scope="module")
def tiny_llama() -> TokenizerBundle:
    """The shipped model's own tokenizer (byte-level BPE), as the router loads it."""
    return TokenizerRegistry.from_catalog_file(CATALOG).get("tiny-llama")


def test_stream_equals_the_full_decode_over_many_sequences(byte_bpe: Tokenizer, llama_sp: Tokenizer,
                                                           tiny_llama: TokenizerBundle) -> None:
    # DecodeStream (one Rust call per id) against one full decode of the same ids: random ids (invalid UTF-8,
    # special tokens), real text with multi-byte characters, and byte-fallback runs of whole characters, pushed
    # one id at a time and in random chunks (a coalesced message, stream_interval > 1).
    rng = random.Random(2024)
    real = tiny_llama.tokenizer
    for _ in range(500):
        random_ids = {tok: [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randint(1, 40))]
                      for tok in (byte_bpe, real)}
        text_ids = {tok: [i for _ in range(3) for i in tok.encode(random_text(rng)).ids]
                    for tok in (byte_bpe, llama_sp, real)}
        for tok, ids in [*random_ids.items(), *text_ids.items()]:
            for chunks in ([[i] for i in ids], random_chunks(rng, ids, most=5)):
                source = tiny_llama if tok is real else tok
                deltas = stream(source, chunks)
                assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True), (ids, chunks, deltas)
                if tok not in random_ids:
                    assert not any(REPLACEMENT_CHAR in d for d in deltas), (ids, deltas)


def test_a_window_that_no_longer_starts_with_its_prefix_still_streams(llama_sp: Tokenizer) -> None:
    # An invalid byte-fallback run ("A" then a lone lead byte): the full decode rewrites the emitted "A" as U+FFFD,
    # DecodeStream refuses the step, and the decoder goes on with the text past the prefix (the known exception).
    ids = [llama_sp.token_to_id(t) for t in ("<0x41>", "<0xC3>", "▁b", "▁a")]
    deltas = stream(llama_sp, [[i] for i in ids])
    assert deltas == ["A", "", "\N{REPLACEMENT CHARACTER} b", " a", ""]


def test_ids_outside_the_vocabulary_are_refused(tiny_llama: TokenizerBundle) -> None:
    decoder = IncrementalDecoder(tiny_llama)
    with pytest.raises(InvalidArgument) as err:
        decoder.push([tiny_llama.vocab_size])
    assert err.value.param == "token_ids"
