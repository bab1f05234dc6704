"""The catalog's ``triton_dir`` (an uploaded Triton model directory): only on an ``infer`` model without a checkpoint,
resolved against the catalog file like its other paths, copied as it is into the repository (at start, or adopted
at run time), and how the executor tells a model the catalog still names from a deleted or re-uploaded one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from inferplane.assets import TINY_LLAMA
from inferplane.common.catalog import Catalog, CatalogModel, load_catalog
from inferplane.executor.main import catalog_sources
from inferplane.executor.repository import copy_triton_dir, remove_model, render_repository

ADD_ONE = Path(__file__).resolve().parents[1] / "data" / "triton_add_one"


def raw(id: str, triton: str, folder: Path | None) -> CatalogModel:
    return CatalogModel.model_validate({"id": id, "triton_model": triton, "tokenizer": TINY_LLAMA, "tasks": ["infer"],
                                        "triton_dir": folder})


def test_triton_dir_is_for_a_raw_infer_model_only() -> None:
    assert raw("add-one", "add-one", ADD_ONE).triton_dir == ADD_ONE
    for extra in ({"tasks": ["chat"]}, {"tasks": ["infer", "embedding"]}, {"checkpoint": str(TINY_LLAMA)}):
        with pytest.raises(ValidationError, match="triton_dir is a raw Triton model"):
            CatalogModel.model_validate({"id": "x", "triton_model": "x", "tokenizer": TINY_LLAMA, "tasks": ["infer"],
                                         "triton_dir": ADD_ONE, **extra})


def test_a_catalog_file_entry_with_a_triton_dir_is_copied_into_the_repository(tmp_path: Path) -> None:
    shutil.copytree(ADD_ONE, tmp_path / "models" / "add-one")
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"models": [
        {"id": "add-one", "tasks": ["infer"], "triton_model": "add-one-v1", "triton_dir": "models/add-one",
         "tokenizer": str(TINY_LLAMA), "prices": {"per_request": "0.000003"}}]}))
    catalog = load_catalog(tmp_path / "catalog.yaml")
    assert catalog.models[0].triton_dir == (tmp_path / "models" / "add-one").resolve()  # against the file's folder
    repo = tmp_path / "repo"
    assert render_repository(catalog, repo) == ["add-one-v1"]
    assert (repo / "add-one-v1" / "config.pbtxt").read_bytes() == (ADD_ONE / "config.pbtxt").read_bytes()
    assert (repo / "add-one-v1" / "1" / "model.py").read_bytes() == (ADD_ONE / "1" / "model.py").read_bytes()


def test_copying_again_replaces_the_folder_and_remove_takes_it_out(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(ADD_ONE, source)
    (source / "1" / "stale.bin").write_bytes(b"old")
    copy_triton_dir("m", source, tmp_path / "repo")
    (source / "1" / "stale.bin").unlink()
    (source / "1" / "__pycache__").mkdir()
    folder = copy_triton_dir("m", source, tmp_path / "repo")
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.py"]  # replaced, no cache copied
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m"]  # no staging folder left
    remove_model("m", tmp_path / "repo")
    assert not folder.exists()


def test_which_triton_models_the_catalog_still_names_and_from_where() -> None:
    upload = raw("add-one", "add-one", ADD_ONE)
    alias = raw("alias", "add-one", None)
    other = CatalogModel.model_validate({"id": "llm", "triton_model": "llm-v2", "versions": {1: "llm-v1", 2: "llm-v2"},
                                         "version": 2, "tokenizer": TINY_LLAMA, "checkpoint": TINY_LLAMA})
    assert catalog_sources(Catalog(models=[alias, upload, other])) == {
        "add-one": ADD_ONE, "llm-v1": None, "llm-v2": TINY_LLAMA}
    assert catalog_sources(Catalog(models=[alias])) == {"add-one": None}
