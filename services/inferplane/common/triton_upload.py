"""Check an uploaded Triton model directory (a tarball of ``config.pbtxt`` and numeric version folders, Python
backend) before anything loads it. The archive's paths are checked by ``model_upload.check_archive``, as a
checkpoint's are; then:

    extract(tar_path, dest, files)           -> the model folder (config.pbtxt's folder) inside dest
    inspect_triton_dir(folder, model_name)   -> TritonDir (config.pbtxt parsed and checked, versions, their bytes)
    fit_check(tdir, free_bytes)              -> FitError when the served versions' bytes x 1.2 > free memory

A Python-backend model has no parameter count: what it needs is the files its served version folders ship (its
weights) with the same headroom as a checkpoint. Only the Python backend is accepted: its runtime (Triton's stub,
the executors' Python) is what inferplane ships; any other backend or platform needs binaries it does not.
Each refusal is a ``model_upload.UploadError`` (``param``: the file at fault) for a 4xx.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from inferplane.common import model_upload as mu

CONFIG = "config.pbtxt"
MODEL_FILE = "model.py"
PYTHON_BACKEND = "python"
MODEL_CLASS = "TritonPythonModel"
# Python-backend parameters that point the stub at binaries inferplane did not ship (a packed conda environment)
FOREIGN_PARAMETERS = ("EXECUTION_ENV_PATH",)


@dataclass(frozen=True, slots=True)
class TritonDir:
    folder: Path
    config: model_config_pb2.ModelConfig
    versions: list[int]  # every numeric version folder
    served: list[int]  # those Triton loads under the config's version policy
    weight_bytes: int  # bytes of the served version folders' files


def extract(tar_path: Path, dest: Path, files: list[str]) -> Path:
    """Unpack into ``dest`` and return the folder holding config.pbtxt (the archive's root or its one top folder)."""
    return mu.extract(tar_path, dest, files, marker=CONFIG, expected="a Triton model directory is expected")


def _refuse(message: str, param: str = CONFIG) -> mu.UploadError:
    return mu.UploadError(message, param=param)


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """config.pbtxt as Triton reads it (protobuf text format of ``inference.ModelConfig``)."""
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise _refuse(f"config.pbtxt is not a Triton model configuration: {exc}") from None


def check_config(config: model_config_pb2.ModelConfig, model_name: str) -> None:
    """The checks on config.pbtxt alone: its name, the Python backend and nothing that needs other binaries."""
    if config.name and config.name != model_name:
        raise _refuse(f"config.pbtxt names the model {config.name!r}, but it is uploaded as {model_name!r}: Triton "
                      "needs the two to match (leave name out, or make it the id)")
    if config.platform:
        raise _refuse(f"config.pbtxt: platform {config.platform!r} needs binaries inferplane does not ship; only the "
                      f'Python backend is accepted here (backend: "{PYTHON_BACKEND}", a model.py)')
    if config.backend != PYTHON_BACKEND:
        named = f"backend {config.backend!r}" if config.backend else "no backend"
        raise _refuse(f'config.pbtxt names {named}: only the Python backend is accepted here (backend: '
                      f'"{PYTHON_BACKEND}", a model.py in each version folder)')
    if config.default_model_filename not in ("", MODEL_FILE):
        raise _refuse(f"config.pbtxt: default_model_filename {config.default_model_filename!r}: the Python "
                      f"backend's file is {MODEL_FILE} here")
    foreign = sorted(set(FOREIGN_PARAMETERS).intersection(config.parameters))
    if foreign:
        raise _refuse(f"config.pbtxt: parameter {foreign[0]} points the Python backend at an environment inferplane "
                      "does not ship; models run on the executors' own Python")
    if config.model_repository_agents.agents:
        agent = config.model_repository_agents.agents[0].name
        raise _refuse(f"config.pbtxt: repository agent {agent!r} needs binaries inferplane does not ship")
    if config.model_transaction_policy.decoupled:
        raise _refuse("config.pbtxt: a decoupled model cannot be reached through the edge (ModelInfer answers once; "
                      "ModelStreamInfer is not served)")


def _check_model_py(path: Path, where: str) -> None:
    try:
        tree = ast.parse(path.read_bytes(), filename=where)
    except (SyntaxError, ValueError) as exc:
        line = f" line {exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
        raise _refuse(f"{where} is not valid Python:{line} {exc.msg if isinstance(exc, SyntaxError) else exc}",
                      where) from None
    if not any(isinstance(node, ast.ClassDef) and node.name == MODEL_CLASS for node in tree.body):
        raise _refuse(f"{where} defines no class {MODEL_CLASS} (what Triton's Python backend runs)", where)


def served_versions(config: model_config_pb2.ModelConfig, versions: list[int]) -> list[int]:
    """The versions Triton loads under the config's ``version_policy`` (default: the latest one)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in versions]
        if missing:
            raise _refuse(f"config.pbtxt: version_policy names versions {missing} that have no folder "
                          f"(folders: {versions})")
        return wanted
    latest = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return versions[-latest:]


def _folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder``, a link counted as its target (a link to a file counted elsewhere
    counts twice: the check errs on the side of refusing)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_links(folder: Path) -> None:
    """The archive's links stay inside the upload; here they must stay inside the model directory too, which the
    executors copy into their repository beside other models."""
    root = folder.resolve()
    for path in folder.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise _refuse(f"{path.relative_to(folder)} links outside the model directory "
                          f"(-> {path.readlink()})", "file")


def inspect_triton_dir(folder: Path, model_name: str) -> TritonDir:
    """config.pbtxt parsed and checked; at least one numeric version folder, each with a model.py that defines
    ``TritonPythonModel``; the bytes of the versions Triton will load."""
    try:
        text = (folder / CONFIG).read_text()
    except UnicodeDecodeError:
        raise _refuse("config.pbtxt is not UTF-8 text") from None
    config = parse_config(text)
    check_config(config, model_name)
    _check_links(folder)
    # Triton's rule: a version folder is named by a positive integer (no leading zero); others are ignored
    versions = sorted(int(p.name) for p in folder.iterdir()
                      if p.is_dir() and not p.is_symlink() and p.name.isdigit() and not p.name.startswith("0"))
    if not versions:
        raise _refuse(f"the model directory has no version folder: put {MODEL_FILE} in a folder named by a "
                      f"positive integer (1/{MODEL_FILE})", "file")
    for version in versions:
        path = folder / str(version) / MODEL_FILE
        if not path.is_file() or path.is_symlink():
            raise _refuse(f"version folder {version}/ has no {MODEL_FILE}", "file")
        _check_model_py(path, f"{version}/{MODEL_FILE}")
    served = served_versions(config, versions)
    weight_bytes = sum(_folder_bytes(folder / str(v)) for v in served)
    return TritonDir(folder, config, versions, served, weight_bytes)


def fit_check(tdir: TritonDir, free_bytes: int, *, where: str = "the executor's free RAM") -> int:
    """The bytes the model needs (its served version folders' bytes x ``HEADROOM``); ``FitError`` beyond
    ``free_bytes``."""
    needed = math.ceil(tdir.weight_bytes * mu.HEADROOM)
    if needed > free_bytes:
        versions = ", ".join(f"{v}/" for v in tdir.served)
        raise mu.FitError(
            f"the model does not fit: its version folder files ({versions}) hold {tdir.weight_bytes:,} bytes x "
            f"{mu.HEADROOM} headroom = {needed:,} bytes ({needed / 2**30:.2f} GiB), but {where} is {free_bytes:,} "
            f"bytes ({free_bytes / 2**30:.2f} GiB): {needed - free_bytes:,} bytes "
            f"({(needed - free_bytes) / 2**30:.2f} GiB) too many", needed=needed, free=free_bytes)
    return needed
