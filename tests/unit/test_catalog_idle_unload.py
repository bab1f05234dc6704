"""The catalog's ``idle_unload_s`` (scale to zero): refused on an ``infer`` model, and each Triton model's idle time
as the executor derives it (the shortest nonzero of its entries; never for one an ``infer`` entry also names)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from inferplane.assets import TINY_LLAMA
from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.executor.main import idle_unload_times


def model(id: str, triton: str, idle: float = 0.0, tasks: list[str] | None = None,
          checkpoint: Path | None = TINY_LLAMA) -> CatalogModel:
    return CatalogModel.model_validate({"id": id, "triton_model": triton, "tokenizer": TINY_LLAMA,
                                        "checkpoint": checkpoint, "idle_unload_s": idle,
                                        "tasks": tasks or ["chat", "completion"]})


def test_idle_unload_is_refused_on_an_infer_model() -> None:
    with pytest.raises(ValidationError, match="idle_unload_s is for chat, completion and embedding models"):
        model("raw", "t", idle=5, tasks=["infer"], checkpoint=None)
    assert model("m", "t").idle_unload_s == 0  # the default: never


def test_each_triton_models_idle_time() -> None:
    catalog = Catalog(models=[
        model("a", "llm", idle=30), model("a-short", "llm", idle=10), model("b", "other"),
        model("emb", "shared", idle=20), model("raw", "shared", tasks=["infer"], checkpoint=None),
        model("c", "no-ckpt", idle=5, checkpoint=None)])
    assert idle_unload_times(catalog, ["llm", "other", "shared"]) == {"llm": 10.0, "other": 0.0, "shared": 0.0}
