"""Render Triton's model repository from the catalog: ``<triton_model>/config.pbtxt`` + ``1/model.py``.

The model code lives in ``services/executor/triton_models/llm/`` (a template of config.pbtxt and the
``TritonPythonModel``); each catalog model with a Llama-format checkpoint becomes one Triton model.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

from services.common.catalog import Catalog, CatalogModel

TEMPLATES = Path(__file__).resolve().parent / "triton_models"


def render_llm_config(model: CatalogModel, *, torch_threads: int) -> str:
    assert model.checkpoint is not None, f"{model.id}: an LLM needs a checkpoint directory"
    template = string.Template((TEMPLATES / "llm" / "config.pbtxt.j2").read_text())
    return template.substitute(
        model_name=model.triton_model,
        checkpoint_dir=str(model.checkpoint),
        instance_kind=model.instance_kind,
        torch_threads=torch_threads,
        max_context=model.context_length,
    )


def render_repository(catalog: Catalog, out: Path, *, model_ids: list[str] | None = None,
                      torch_threads: int = 0) -> list[str]:
    """Write the repository into ``out`` (replacing what was there); return the Triton model names."""
    chosen = [m for m in catalog.models
              if m.checkpoint is not None and not m.is_embedding and (not model_ids or m.id in model_ids)]
    if model_ids:
        missing = set(model_ids) - {m.id for m in chosen}
        if missing:
            raise ValueError(f"not in the catalog (or without a checkpoint): {sorted(missing)}")
    if out.exists():
        shutil.rmtree(out)
    for model in chosen:
        folder = out / model.triton_model
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(render_llm_config(model, torch_threads=torch_threads))
        shutil.copyfile(TEMPLATES / "llm" / "model.py", folder / "1" / "model.py")
    return [m.triton_model for m in chosen]
