"""The checks an uploaded Triton model directory passes before anything loads it (``inferplane.common.triton_upload``):
config.pbtxt parsed with Triton's own ``ModelConfig``, its name, the Python backend only, nothing that needs binaries
inferplane did not ship, numeric version folders each with a model.py defining ``TritonPythonModel``, the version
policy, and the fit check on the served version folders' bytes with its numbers. The archive's paths are
``model_upload.check_archive``'s (tests/unit/test_model_upload_checks.py); one traversal case is repeated here."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from inferplane.common.model_upload import FitError, UploadError, check_archive
from inferplane.common.model_upload import extract as checkpoint_extract
from inferplane.common.triton_upload import extract, fit_check, inspect_triton_dir

ADD_ONE = Path(__file__).resolve().parents[1] / "data" / "triton_add_one"
GIB = 1 << 30


def model_dir(tmp_path: Path, config: str | None = None, **files: bytes) -> Path:
    """A copy of the add-one model; ``config`` replaces its config.pbtxt, ``files`` (path with '__' for '/') add or
    replace files."""
    folder = tmp_path / "add-one"
    shutil.copytree(ADD_ONE, folder)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    for name, data in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def refused(folder: Path, name: str = "add-one") -> UploadError:
    with pytest.raises(UploadError) as caught:
        inspect_triton_dir(folder, name)
    assert caught.value.status == 400
    return caught.value


def test_the_shipped_add_one_directory_passes_through_a_tarball(tmp_path: Path) -> None:
    tar = tmp_path / "up.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(ADD_ONE, arcname="add-one")
    files = check_archive(tar, max_unpacked=1 << 30)
    assert "add-one/config.pbtxt" in files and "add-one/1/model.py" in files
    folder = extract(tar, tmp_path / "unpacked", files)
    assert folder == (tmp_path / "unpacked" / "add-one").resolve()
    tdir = inspect_triton_dir(folder, "add-one")
    assert tdir.config.backend == "python" and tdir.versions == [1] and tdir.served == [1]
    assert tdir.weight_bytes == (ADD_ONE / "1" / "model.py").stat().st_size
    assert fit_check(tdir, free_bytes=GIB) == -(-tdir.weight_bytes * 12 // 10)  # bytes x 1.2, rounded up


def test_an_archive_without_config_pbtxt_or_leaving_its_folder_is_refused(tmp_path: Path) -> None:
    tar = tmp_path / "up.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("add-one/1/model.py")
        info.size = 3
        t.addfile(info, io.BytesIO(b"x=1"))
    with pytest.raises(UploadError, match=r"no config\.pbtxt"):
        extract(tar, tmp_path / "out", check_archive(tar, max_unpacked=1 << 20))
    assert not (tmp_path / "out").exists()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        info = tarfile.TarInfo("add-one/../../config.pbtxt")
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(UploadError, match="leaves the upload's folder"):
        check_archive(evil, max_unpacked=1 << 20)


def test_config_pbtxt_must_parse_as_a_model_configuration(tmp_path: Path) -> None:
    error = refused(model_dir(tmp_path, 'backend: "python"\nmax_batch_size: banana\n'))
    assert error.param == "config.pbtxt" and "not a Triton model configuration" in str(error)
    assert "max_batch_size" in str(error)
    error = refused(model_dir(tmp_path / "b", 'backend: "python"\nno_such_field: 1\n'))
    assert "no_such_field" in str(error)


def test_its_name_must_be_the_id_it_is_uploaded_under(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, 'name: "other" backend: "python"')
    error = refused(folder, "add-one")
    assert "'other'" in str(error) and "'add-one'" in str(error) and error.param == "config.pbtxt"
    inspect_triton_dir(model_dir(tmp_path / "ok", 'name: "add-one" backend: "python"'), "add-one")


@pytest.mark.parametrize("config", ['backend: "onnxruntime"', 'backend: "pytorch"', 'backend: "tensorrt"', ""])
def test_only_the_python_backend_is_accepted(tmp_path: Path, config: str) -> None:
    error = refused(model_dir(tmp_path, config))
    assert "only the Python backend is accepted here" in str(error) and error.param == "config.pbtxt"


@pytest.mark.parametrize("config, words", [
    ('platform: "onnxruntime_onnx"', "platform 'onnxruntime_onnx' needs binaries"),
    ('platform: "ensemble" backend: "python"', "platform 'ensemble'"),
    ('backend: "python" parameters { key: "EXECUTION_ENV_PATH" '
     'value: { string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }', "EXECUTION_ENV_PATH"),
    ('backend: "python" model_repository_agents { agents [ { name: "checksum" } ] }', "repository agent 'checksum'"),
    ('backend: "python" default_model_filename: "serve.py"', "default_model_filename 'serve.py'"),
    ('backend: "python" model_transaction_policy { decoupled: true }', "decoupled"),
])
def test_what_needs_other_binaries_or_cannot_cross_the_edge_is_refused(tmp_path: Path, config: str,
                                                                       words: str) -> None:
    assert words in str(refused(model_dir(tmp_path, config)))


def test_a_numeric_version_folder_with_a_model_py_is_required(tmp_path: Path) -> None:
    folder = model_dir(tmp_path)
    shutil.rmtree(folder / "1")
    (folder / "01").mkdir()  # Triton ignores a name with a leading zero
    (folder / "01" / "model.py").write_text("class TritonPythonModel: pass\n")
    (folder / "latest").mkdir()
    assert "no version folder" in str(refused(folder))
    assert "2/ has no model.py" in str(refused(model_dir(tmp_path / "b", None, **{"2__weights.bin": b"0"})))


def test_model_py_must_be_python_defining_triton_python_model(tmp_path: Path) -> None:
    error = refused(model_dir(tmp_path, None, **{"1__model.py": b"class TritonPythonModel(:\n"}))
    assert error.param == "1/model.py" and "not valid Python" in str(error) and "line 1" in str(error)
    error = refused(model_dir(tmp_path / "b", None, **{"1__model.py": b"def execute(requests):\n    return []\n"}))
    assert "defines no class TritonPythonModel" in str(error)


def test_the_version_policy_decides_which_folders_are_counted(tmp_path: Path) -> None:
    weights = {"2__model.py": (ADD_ONE / "1" / "model.py").read_bytes(), "2__weights.bin": bytes(1000)}
    tdir = inspect_triton_dir(model_dir(tmp_path, None, **weights), "add-one")
    assert tdir.versions == [1, 2] and tdir.served == [2]  # latest 1, Triton's default
    v1 = (ADD_ONE / "1" / "model.py").stat().st_size
    assert tdir.weight_bytes == v1 + 1000
    every = inspect_triton_dir(model_dir(tmp_path / "b", 'backend: "python" version_policy: { all: {} }', **weights),
                               "add-one")
    assert every.served == [1, 2] and every.weight_bytes == 2 * v1 + 1000
    one = inspect_triton_dir(model_dir(tmp_path / "c", 'backend: "python" version_policy: { specific: '
                                                       '{ versions: [1] } }', **weights), "add-one")
    assert one.served == [1] and one.weight_bytes == v1
    error = refused(model_dir(tmp_path / "d", 'backend: "python" version_policy: { specific: { versions: [3] } }'))
    assert "versions [3] that have no folder" in str(error)


def test_a_model_that_does_not_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    tdir = inspect_triton_dir(model_dir(tmp_path, None, **{"1__weights.bin": bytes(10_000)}), "add-one")
    assert tdir.weight_bytes > 10_000
    with pytest.raises(FitError) as caught:
        fit_check(tdir, free_bytes=5_000)
    needed = -(-tdir.weight_bytes * 12 // 10)
    assert caught.value.status == 422 and (caught.value.needed, caught.value.free) == (needed, 5_000)
    message = str(caught.value)
    assert f"hold {tdir.weight_bytes:,} bytes x 1.2 headroom = {needed:,} bytes" in message
    assert "free RAM is 5,000 bytes" in message and f"{needed - 5_000:,} bytes" in message and "too many" in message


def test_a_link_out_of_the_model_directory_is_refused_and_weights_behind_links_count(tmp_path: Path) -> None:
    (tmp_path / "sibling.bin").write_bytes(bytes(500))  # inside the upload, outside the model directory
    folder = model_dir(tmp_path)
    (folder / "1" / "w.bin").symlink_to("../../sibling.bin")
    error = refused(folder)
    assert "1/w.bin links outside the model directory" in str(error) and error.param == "file"
    inside = model_dir(tmp_path / "b", None, **{"weights.bin": bytes(700)})  # beside config.pbtxt, not a version
    (inside / "1" / "w.bin").symlink_to("../weights.bin")
    tdir = inspect_triton_dir(inside, "add-one")
    assert tdir.weight_bytes == (ADD_ONE / "1" / "model.py").stat().st_size + 700


def test_a_triton_directory_sent_as_a_checkpoint_is_told_to_use_kind_triton(tmp_path: Path) -> None:
    tar = tmp_path / "up.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(ADD_ONE, arcname="add-one")
    with pytest.raises(UploadError, match="upload a Triton model directory with kind=triton"):
        checkpoint_extract(tar, tmp_path / "out", check_archive(tar, max_unpacked=1 << 20))
