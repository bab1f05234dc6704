"""The model catalog: one YAML file naming each public model and how it is served.

    models:
      - id: tiny-llama              # public model id
        tasks: [chat, completion]
        triton_model: tiny-llama    # model name in Triton's repository
        checkpoint: ../models/tiny-llama   # Llama-format dir (config.json + safetensors); relative to this file
        tokenizer: ../models/tiny-llama    # dir with tokenizer.json (+ tokenizer_config.json chat_template)
        context_length: 512
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, field_validator

Task = Literal["chat", "completion", "embedding"]


class CatalogModel(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    tasks: list[Task] = Field(default_factory=lambda: list[Task](["chat", "completion"]))
    triton_model: str
    checkpoint: Path | None = None
    tokenizer: Path
    context_length: int = Field(default=2048, gt=0)
    owned_by: str = "inferplane"
    created: int = 1_764_547_200  # 2025-12-01T00:00:00Z; shown as OpenAI's "created"
    # Device kind for Triton instances: KIND_CPU here, KIND_GPU on a GPU machine.
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"


class Catalog(BaseModel):
    models: list[CatalogModel]

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[CatalogModel]) -> list[CatalogModel]:
        ids = [m.id for m in models]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate model ids in catalog: {sorted(dupes)}")
        return models

    def get(self, model_id: str) -> CatalogModel | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


def load_catalog(path: Path) -> Catalog:
    """Read the catalog; relative paths are resolved against the catalog file's folder."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    catalog = Catalog.model_validate(data)
    base = path.resolve().parent
    for m in catalog.models:
        m.tokenizer = (base / m.tokenizer).resolve()
        if m.checkpoint is not None:
            m.checkpoint = (base / m.checkpoint).resolve()
    return catalog
