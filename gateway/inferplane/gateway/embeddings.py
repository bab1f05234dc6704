"""``POST /v1/embeddings``: the request model, its conversion, and the OpenAI ``list`` of ``embedding`` objects."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from inferplane.gateway.protocol import REQUEST_CONFIG, Count32
from inferplane.v1 import router_pb2


class EmbeddingRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)
    # A string or a list of strings (token-id arrays are not accepted: the tokenizer is the server's).
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Count32 | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("'input' must not be an empty list")
        if any(not s for s in items):
            raise ValueError("'input' must not contain empty strings")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def to_embed_request(self) -> router_pb2.EmbedRequest:
        return router_pb2.EmbedRequest(model=self.model, inputs=self.inputs())


def encode_vector(values: Any, fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI's SDKs decode it
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
    return [float(v) for v in values]


def embeddings_body(resp: router_pb2.EmbedResponse, req: EmbeddingRequest) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(e.values, req.encoding_format)}
                 for i, e in enumerate(resp.embeddings)],
        "model": resp.model or req.model,
        "usage": {"prompt_tokens": resp.usage.prompt_tokens, "total_tokens": resp.usage.prompt_tokens},
    }
