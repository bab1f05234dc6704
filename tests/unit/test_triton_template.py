"""A catalog model with a Triton template of its own (``triton_template``): how the benchmarks' fast model is served.

The shipped catalog names no such model (``inferplane up`` never serves the fast model); a template folder is
rendered with the LLM's placeholders and contract, and gets ``inferplane.modeling``'s contract only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from inferplane.executor.repository import render_repository
from inferplane.modeling.contract import LLM, LLMChannel

BENCH_CATALOG = Path(__file__).resolve().parents[2] / "bench" / "fast_model" / "catalog.yaml"


def test_the_shipped_catalog_serves_no_template_of_its_own() -> None:
    catalog = load_catalog(CATALOG)
    assert all(m.triton_template is None and not m.triton_parameters for m in catalog.models)
    assert catalog.get("fast-sim") is None


def test_a_template_folder_is_rendered_with_the_llm_contract(tmp_path: Path) -> None:
    catalog = load_catalog(BENCH_CATALOG)
    model = catalog.get("fast-sim")
    assert model is not None and model.triton_template == BENCH_CATALOG.parent  # relative to the catalog file
    assert render_repository(catalog, tmp_path / "repo") == ["fast-sim"]
    folder = tmp_path / "repo" / "fast-sim"
    config = (folder / "config.pbtxt").read_text()
    assert 'name: "fast-sim"' in config and "decoupled: true" in config
    assert all(f'name: "{spec.name}"' in config
               for spec in (*LLM.INPUTS, *LLM.OUTPUTS, *LLMChannel.INPUTS, *LLMChannel.OUTPUTS))
    assert 'key: "tokens_per_s"' in config and 'key: "max_context" value: { string_value: "4096" }' in config
    assert (folder / "1" / "model.py").read_text() == (BENCH_CATALOG.parent / "model.py").read_text()
    assert sorted(p.name for p in (folder / "1" / "inferplane" / "modeling").iterdir()) == [
        "__init__.py", "channel.py", "contract.py"]  # the contract and the channel mode's IPC side


def test_parameters_without_a_template_are_refused(tmp_path: Path) -> None:
    catalog = load_catalog(CATALOG)
    catalog.models[0].triton_parameters = {"ipc_duty": "0.5"}
    with pytest.raises(AssertionError, match="triton_parameters go with a triton_template"):
        render_repository(catalog, tmp_path / "repo")
