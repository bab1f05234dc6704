"""One model's tokenizer as Hugging Face ships it: ``tokenizer.json`` plus its chat template and special tokens.

``TokenizerBundle.from_dir`` reads a tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``, and
optionally ``generation_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``). Chat templates
render in a sandboxed Jinja environment set up as ``transformers`` sets it up, so templates written for
``apply_chat_template`` render the same text here. Nothing in this module knows about gRPC.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from inferplane.common.errors import InvalidArgument

log = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# End-of-turn tokens of common chat formats (Phi, Llama 3, ChatML): generation stops on them too.
END_OF_TURN_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>")
# Special-token names transformers passes to a chat template (its ``special_tokens_map``).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(Exception):
    """Raised by a template's ``raise_exception(...)``: the template refuses the conversation."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' version: unlike Jinja's built-in, it does not HTML-escape and keeps non-ASCII as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension declares it a plain class attribute)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _chat_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as HF writes it: a string, or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any, source: Path) -> str | None:
    """``chat_template`` is a string, or a list of ``{name, template}`` of which "default" is the chat one."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        if isinstance(template, str):
            return template
        raise ValueError(f"{source}: chat_template list has no 'default' entry (has {sorted(map(str, named))})")
    raise ValueError(f"{source}: chat_template must be a string or a list of {{name, template}}")


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder is (or contains) ByteLevel."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    parts = [decoder, *(decoder.get("decoders") or [])]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a conversation no template should see: empty, unknown roles, non-text content."""
    if not messages:
        raise InvalidArgument("chat needs at least one message", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role is {role!r}; expected one of {', '.join(sorted(CHAT_ROLES))}",
                param=f"messages[{i}].role",
            )
        if not isinstance(message.get("content"), str):
            raise InvalidArgument(f"messages[{i}].content must be a string", param=f"messages[{i}].content")


@dataclass
class TokenizerBundle:
    """A loaded tokenizer, its chat template and its special tokens."""

    name: str
    tokenizer: Tokenizer
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # "bos_token" -> "<s>", ...
    # When true and the rendered chat does not start with BOS, ``encode_chat`` puts it first.
    add_bos_token: bool = False
    generation_eos_ids: list[int] = field(default_factory=list)  # generation_config.json's eos_token_id
    stop_token_ids: list[int] = field(init=False)
    vocab_size: int = field(init=False)  # one past the highest id: valid ids are [0, vocab_size)
    _template: jinja2.Template | None = field(init=False, default=None, repr=False)
    _bytes_table: list[bytes] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        stops: list[int] = list(self.generation_eos_ids)
        for token in (self.special_tokens.get("eos_token"), *END_OF_TURN_TOKENS):
            token_id = vocab.get(token) if token else None
            if token_id is not None:
                stops.append(token_id)
        self.stop_token_ids = list(dict.fromkeys(stops))  # unique, first-seen order
        if self.chat_template is not None:
            try:
                self._template = _chat_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"tokenizer {self.name}: chat template does not compile: {exc}") from exc

    @classmethod
    def from_dir(cls, path: Path, *, name: str | None = None) -> TokenizerBundle:
        """Load a Hugging Face tokenizer folder. Raises ``FileNotFoundError``/``ValueError`` on a bad folder."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # Some tokenizer.json files (all-MiniLM-L6-v2's among them) switch on padding and truncation; token
        # counts must be the text's real ones, and a too-long input is refused, never silently cut.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")

        special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(key)) or _token_content(special_map.get(key))
            if content is not None:
                special_tokens[key] = content
        chat_template = _pick_chat_template(config.get("chat_template"), path / "tokenizer_config.json")
        jinja_file = path / "chat_template.jinja"  # newer transformers save the template on its own
        if chat_template is None and jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        return cls(
            name=name or path.name,
            tokenizer=tokenizer,
            chat_template=chat_template,
            special_tokens=special_tokens,
            add_bos_token=bool(config.get("add_bos_token", False)),
            generation_eos_ids=_as_id_list(generation.get("eos_token_id")),
        )

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return self.tokenizer.token_to_id(bos) if bos else None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; by default no special tokens are added (the chat template places them).

        ``add_special_tokens`` applies the tokenizer's own post-processor (BERT's ``[CLS] ... [SEP]``),
        as encoders such as embedding models expect.
        """
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (the library encodes them in parallel)."""
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it."""
        if self._template is None:
            raise InvalidArgument(f"model {self.name} has no chat template: send text, not chat", param="messages")
        validate_messages(messages)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except ChatTemplateError as exc:
            raise InvalidArgument(f"chat template of model {self.name} refused the messages: {exc}",
                                  param="messages") from exc
        except jinja2.TemplateError as exc:
            raise InvalidArgument(f"chat template of model {self.name} failed on these messages: {exc}",
                                  param="messages") from exc

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> tuple[list[int], str]:
        """Render and encode a conversation: ``(token ids, rendered text)``."""
        rendered = self.render_chat(messages, add_generation_prompt)
        ids = self.encode(rendered)
        bos = self.bos_token_id
        if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # the tokenizer wants a BOS and the template did not write one
        return ids, rendered

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each id's own bytes (a byte-level BPE token may hold part of a UTF-8 character): what OpenAI's logprobs
        ``bytes`` list. Ids outside the vocabulary are an ``InvalidArgument``."""
        self.check_ids(ids)
        table = self._token_bytes_table()
        return [table[i] for i in ids]

    def _token_bytes_table(self) -> list[bytes]:
        """Every id's bytes, built once: byte-level tokens map back through GPT-2's byte alphabet, ``<0xNN>``
        byte-fallback tokens are their byte, SentencePiece's ``▁`` is a space, added tokens are their content."""
        if self._bytes_table is not None:
            return self._bytes_table
        byte_level = _is_byte_level(self.tokenizer)
        alphabet = {c: b for b, c in _gpt2_byte_alphabet().items()}
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        table: list[bytes] = []
        for i in range(self.vocab_size):
            token = self.tokenizer.id_to_token(i)
            if token is None:
                table.append(b"")
            elif token in added:
                table.append(token.encode())
            elif byte_level and all(c in alphabet for c in token):
                table.append(bytes(alphabet[c] for c in token))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                table.append(bytes([int(token[3:5], 16)]))
            else:
                table.append(token.replace("\u2581", " ").encode())
        self._bytes_table = table
        return table

    def check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise InvalidArgument(f"token id {bad} is outside model {self.name}'s vocabulary [0, {self.vocab_size})",
                                  param="token_ids")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary are an ``InvalidArgument``."""
        self.check_ids(ids)
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))
