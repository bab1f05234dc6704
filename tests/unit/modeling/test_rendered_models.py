"""The rendered model repository is self-contained: each version folder carries the model code it imports.

A rendered ``model.py`` is imported in a fresh interpreter (``python -I -S -B``) whose ``sys.path`` is the version
folder, the folder of Triton's ``triton_python_backend_utils`` and the standard library and site-packages (for
torch): the mesh's source is not on it. The config.pbtxt tensors are the contract's, and ``torch_threads``
reaches every model.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from inferplane.executor.repository import MODELING, render_repository
from inferplane.executor.triton_process import pytriton_root
from inferplane.modeling.contract import LLM, Embedding, LLMChannel, TensorSpec

IMPORT_MODEL = """
import importlib.util, json, sys
sys.path[:0] = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("model", sys.argv[2])
module = sys.modules["model"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import inferplane.modeling
print(json.dumps({
    "model": hasattr(module, "TritonPythonModel"),
    "modeling": list(inferplane.modeling.__path__),
    "inferplane": sorted(m for m in sys.modules if m.split(".")[0] == "inferplane"),
    "executor_importable": importlib.util.find_spec("inferplane.executor") is not None,
}))
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered") / "repo"
    assert render_repository(load_catalog(CATALOG), out, torch_threads=1) == ["tiny-llama", "all-minilm-l6-v2"]
    return out


def import_isolated(version_dir: Path) -> dict[str, object]:
    backend_utils = pytriton_root() / "backends" / "python"
    assert (backend_utils / "triton_python_backend_utils.py").exists()
    site = sysconfig.get_paths()["purelib"]  # torch, numpy, safetensors; -S: its .pth files (the editable
    # install of the mesh) are not run
    path = [str(version_dir), str(backend_utils), site]
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", IMPORT_MODEL, json.dumps(path),
                           str(version_dir / "model.py")], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize(("model", "package_part"), [("tiny-llama", "llama"), ("all-minilm-l6-v2", "bert.py")])
def test_a_rendered_model_imports_without_the_mesh(repo: Path, model: str, package_part: str) -> None:
    version = repo / model / "1"
    assert (version / "inferplane" / "modeling" / package_part).exists()
    assert not (version / "inferplane" / "__init__.py").exists(), "inferplane must stay a namespace package"
    got = import_isolated(version)
    assert got["model"] is True
    assert got["modeling"] == [str(version / "inferplane" / "modeling")], "imported the copy beside model.py"
    assert got["executor_importable"] is False, "the mesh's code was on the path"
    imported = got["inferplane"]
    assert isinstance(imported, list) and "inferplane.modeling.contract" in imported
    assert all(m == "inferplane" or m.startswith("inferplane.modeling") for m in imported), imported


def test_only_the_model_code_a_model_needs_is_copied(repo: Path) -> None:
    llm = repo / "tiny-llama" / "1" / "inferplane" / "modeling"
    emb = repo / "all-minilm-l6-v2" / "1" / "inferplane" / "modeling"
    assert sorted(p.name for p in llm.iterdir()) == ["__init__.py", "blocks.py", "channel.py", "contract.py",
                                                     "instance.py", "llama"]
    assert sorted(p.name for p in emb.iterdir()) == ["__init__.py", "bert.py", "contract.py", "instance.py"]
    for name in ("model.py", "batching.py", "loader.py"):
        assert (llm / "llama" / name).read_bytes() == (MODELING / "llama" / name).read_bytes()
    assert not list((llm / "llama").glob("__pycache__"))


def config_tensors(config: str, section: str) -> list[tuple[str, str, str, bool, bool]]:
    block = re.search(rf"^{section} \[\n(.*?)\n\]", config, re.M | re.S)
    assert block, f"no {section} block"
    out = []
    for line in block.group(1).splitlines():
        m = re.fullmatch(r'\s*\{ name: "(\w+)" data_type: (\w+) dims: \[ ([-\d, ]+) \](.*) \},?', line)
        assert m, line
        out.append((m[1], m[2], m[3], "allow_ragged_batch: true" in m[4], "optional: true" in m[4]))
    return out


def spec_tuple(spec: TensorSpec) -> tuple[str, str, str, bool, bool]:
    return spec.name, spec.config_type, ", ".join(map(str, spec.dims)), spec.ragged, spec.optional


# The LLM's config declares the per-request contract's tensors and the channel mode's, every input optional (an
# attach or a cancel carries no input_ids/max_tokens; the model refuses a generation without them).
LLM_CONFIG = ([replace(s, optional=True) for s in (*LLM.INPUTS, *LLMChannel.INPUTS)],
              [*LLM.OUTPUTS, *LLMChannel.OUTPUTS])


@pytest.mark.parametrize(("model", "inputs", "outputs"), [("tiny-llama", *LLM_CONFIG),
                                                          ("all-minilm-l6-v2", Embedding.INPUTS, Embedding.OUTPUTS)])
def test_config_tensors_are_the_contracts(repo: Path, model: str, inputs: list[TensorSpec],
                                          outputs: list[TensorSpec]) -> None:
    config = (repo / model / "config.pbtxt").read_text()
    assert config_tensors(config, "input") == [spec_tuple(s) for s in inputs]
    assert config_tensors(config, "output") == [spec_tuple(s) for s in outputs]
    body = [line for line in config.splitlines() if not line.startswith("#")]
    assert not [line for line in body if "$" in line], "every placeholder is rendered"


@pytest.mark.parametrize("model", ["tiny-llama", "all-minilm-l6-v2"])
def test_torch_threads_reaches_every_model(repo: Path, model: str) -> None:
    config = (repo / model / "config.pbtxt").read_text()
    assert '{ key: "torch_threads" value: { string_value: "1" } }' in config
    keys = re.findall(r'key: "(\w+)"', config)
    assert set(keys) <= set(LLM.PARAMETERS if model == "tiny-llama" else Embedding.PARAMETERS), keys
