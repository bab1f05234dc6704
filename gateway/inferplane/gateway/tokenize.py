"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes, done by the router's tokenizer (``Tokenize`` and
``Detokenize`` on ``RouterService``): the same key check as every route, OpenAI-shaped errors.

``/tokenize`` takes a completion prompt (``prompt``) or a conversation (``messages``) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; the ids are the ones a generation with the same input
counts as its ``prompt_tokens``. ``/detokenize`` takes ``tokens`` and answers ``{"prompt"}``. vLLM's options that
are not served here are refused by name, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, Field, model_validator

from inferplane.common import wire
from inferplane.gateway.auth import key_metadata
from inferplane.gateway.generation import parse_body
from inferplane.gateway.protocol import INT32_MAX, REQUEST_CONFIG, ChatMessageParam
from inferplane.gateway.upstream import RouterApi
from inferplane.v1 import router_pb2

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


def _must_be(value: Any, wanted: Any, why: str) -> Any:
    if value is not None and value != wanted:
        raise ValueError(why)
    return value


class TokenizeRequest(BaseModel):
    """vLLM's ``TokenizeCompletionRequest`` (``prompt``) or ``TokenizeChatRequest`` (``messages``)."""

    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = Field(None, min_length=1)
    # None: as a generation encodes the input (a prompt as is; the chat template places a conversation's tokens).
    add_special_tokens: bool | None = None
    add_generation_prompt: Annotated[bool | None, BeforeValidator(
        lambda v: _must_be(v, True, "only add_generation_prompt=true is supported (as chat completions render)"))
    ] = None
    continue_final_message: Annotated[bool | None, BeforeValidator(
        lambda v: _must_be(v, False, "continue_final_message is not supported"))] = None
    return_token_strs: Annotated[bool | None, BeforeValidator(
        lambda v: _must_be(v, False, "return_token_strs is not supported"))] = None
    chat_template: Annotated[Any, BeforeValidator(
        lambda v: _must_be(v, None, "a custom chat_template is not supported (the model's own is used)"))] = None
    tools: Annotated[Any, BeforeValidator(lambda v: _must_be(v, None, "tools are not supported"))] = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' is required")
        return self

    def to_pb(self) -> router_pb2.TokenizeRequest:
        req = router_pb2.TokenizeRequest(model=self.model)
        if self.messages is not None:
            req.chat.messages.extend(m.to_pb() for m in self.messages)
        else:
            req.prompt = self.prompt or ""
        if self.add_special_tokens is not None:
            req.add_special_tokens = self.add_special_tokens
        return req


class DetokenizeRequest(BaseModel):
    """vLLM's ``DetokenizeRequest``."""

    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)
    tokens: list[TokenId]

    def to_pb(self) -> router_pb2.DetokenizeRequest:
        return router_pb2.DetokenizeRequest(model=self.model, tokens=self.tokens)


def tokenize_body(resp: router_pb2.TokenizeResponse) -> dict[str, Any]:
    tokens = list(resp.tokens)
    return {"count": len(tokens), "max_model_len": resp.max_model_len, "tokens": tokens, "token_strs": None}


def _call(request: Request) -> tuple[RouterApi, tuple[tuple[str, str], ...]]:
    """The router, and the caller's key (401 before any call when absent or ill-formed) with the request id."""
    router: RouterApi = request.app.state.router
    return router, (*key_metadata(request.headers), (wire.REQUEST_ID, request.state.request_id))


async def tokenize_route(request: Request) -> Response:
    router, metadata = _call(request)
    body = await parse_body(request, TokenizeRequest)
    return JSONResponse(tokenize_body(await router.tokenize(body.to_pb(), metadata=metadata)))


async def detokenize_route(request: Request) -> Response:
    router, metadata = _call(request)
    body = await parse_body(request, DetokenizeRequest)
    resp = await router.detokenize(body.to_pb(), metadata=metadata)
    return JSONResponse({"prompt": resp.prompt})
