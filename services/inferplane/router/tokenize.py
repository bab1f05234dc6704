"""``Tokenize`` and ``Detokenize``: the model's tokenizer as a public service (vLLM's ``/tokenize``, ``/detokenize``).

The work is the router's own tokenizer's (``inferplane.tokenization``: in process, or the tokenizer service, as the
settings pick), so a prompt is counted exactly as ``Generate`` counts it: a completion prompt as is, a conversation
through the chat template with a generation prompt. No executor is asked and nothing is metered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inferplane.common.errors import InvalidArgument
from inferplane.router.engine import GenerationEngine
from inferplane.v1 import common_pb2

# Token ids in one Detokenize: a context's worth many times over, and still a bounded decode.
MAX_DETOKENIZE_IDS = 1 << 20


@dataclass(frozen=True, slots=True)
class Tokenized:
    token_ids: list[int]
    max_model_len: int


async def tokenize(engine: GenerationEngine, model_id: str, *, prompt: str | None = None,
                   messages: Sequence[common_pb2.ChatMessage] | None = None, add_special_tokens: bool = False,
                   deadline: float | None = None) -> Tokenized:
    """The ids of ``prompt`` or of ``messages`` (exactly one), and the model's context length."""
    model = engine.model(model_id)
    timeout = engine.clock(model, deadline).left()
    if messages is not None:
        if add_special_tokens:
            raise InvalidArgument("'add_special_tokens' applies to a prompt, not to messages (the chat template "
                                  "places the special tokens).", param="add_special_tokens")
        if not messages:
            raise InvalidArgument("'messages' must contain at least one message.", param="messages")
        encoded = await engine.tokenizer.encode_chat(model.id, messages, timeout=timeout)
        return Tokenized(encoded.token_ids, model.context_length)
    if prompt is None:
        raise InvalidArgument("either 'prompt' or 'messages' is required", param="prompt")
    if add_special_tokens:
        [ids] = await engine.tokenizer.encode_batch(model.id, [prompt], add_special_tokens=True, timeout=timeout)
        return Tokenized(ids, model.context_length)
    encoded = await engine.tokenizer.encode_text(model.id, prompt, timeout=timeout)
    return Tokenized(encoded.token_ids, model.context_length)


async def detokenize(engine: GenerationEngine, model_id: str, token_ids: Sequence[int], *,
                     deadline: float | None = None) -> str:
    """The text of ``token_ids``, special tokens kept; an id outside the vocabulary is an ``InvalidArgument``."""
    model = engine.model(model_id)
    if len(token_ids) > MAX_DETOKENIZE_IDS:
        raise InvalidArgument(f"'tokens' has {len(token_ids)} ids; at most {MAX_DETOKENIZE_IDS} are allowed.",
                              param="tokens")
    try:
        return await engine.tokenizer.decode(model.id, token_ids, timeout=engine.clock(model, deadline).left())
    except InvalidArgument as exc:  # the tokenizer names its own field (token_ids)
        raise InvalidArgument(str(exc), param="tokens") from None
