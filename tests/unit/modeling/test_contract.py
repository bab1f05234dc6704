"""What ``inferplane.modeling`` may import, and the contract's agreement with the model code it describes."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import get_args

import pytest

from inferplane.executor.repository import MODELING, TEMPLATES
from inferplane.modeling.contract import LLM, NUMPY_DTYPES, Embedding
from inferplane.modeling.llama.generate import FinishReason

THIRD_PARTY = {"torch", "numpy", "safetensors", "llguidance"}
MODEL_FILES = sorted(MODELING.rglob("*.py"))
TRITON_MODELS = sorted(TEMPLATES.glob("*/model.py"))


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: str(p.relative_to(MODELING)))
def test_modeling_imports_only_itself_torch_numpy_safetensors_and_the_standard_library(path: Path) -> None:
    for name in imports(path):
        top = name.split(".")[0]
        if top == "inferplane":
            assert name.startswith("inferplane.modeling"), f"{path.name} imports {name}"
        else:
            assert top in THIRD_PARTY or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_the_contract_imports_no_torch() -> None:
    # the executor imports it (and inferplane/modeling/__init__.py) without torch
    for path in (MODELING / "contract.py", MODELING / "__init__.py"):
        assert {n.split(".")[0] for n in imports(path)} <= set(sys.stdlib_module_names), path.name


@pytest.mark.parametrize("path", TRITON_MODELS, ids=lambda p: p.parent.name)
def test_triton_models_import_nothing_of_the_mesh(path: Path) -> None:
    for name in imports(path):
        top = name.split(".")[0]
        assert (name.startswith("inferplane.modeling") or top in {"torch", "numpy", "triton_python_backend_utils"}
                or top in sys.stdlib_module_names), f"{path.parent.name}/model.py imports {name}"


def test_the_contract_agrees_with_the_model_code() -> None:
    assert get_args(FinishReason) == LLM.FINISH_REASONS
    for spec in (*LLM.INPUTS, *LLM.OUTPUTS, *Embedding.INPUTS, *Embedding.OUTPUTS):
        assert spec.datatype in NUMPY_DTYPES and spec.config_type.startswith("TYPE_")
    assert len({s.name for s in LLM.INPUTS}) == len(LLM.INPUTS)
    assert [s.name for s in LLM.INPUTS if not s.optional] == ["input_ids", "max_tokens"]
