"""The checks an uploaded checkpoint passes before anything loads it (``inferplane.common.model_upload``): archive
paths, safetensors headers and the parameter count, config sanity, the fit check with its numbers, the size limit."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from safetensors import safe_open

from inferplane.assets import TINY_LLAMA
from inferplane.common.model_upload import (
    FitError,
    UploadError,
    check_archive,
    extract,
    fit_check,
    inspect_checkpoint,
    receive,
    verify_data,
)

GIB = 1 << 30


def tarball(path: Path, folder: Path, arcname: str = "my-upload") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def test_a_copy_of_tiny_llama_passes_with_its_parameter_count(tmp_path: Path) -> None:
    tar = tarball(tmp_path / "up.tar.gz", TINY_LLAMA)
    files = check_archive(tar, max_unpacked=1 << 30)
    assert "my-upload/config.json" in files and "my-upload/model.safetensors" in files
    folder = extract(tar, tmp_path / "unpacked", files)
    assert folder == (tmp_path / "unpacked" / "my-upload").resolve()
    ckpt = inspect_checkpoint(folder)
    with safe_open(str(TINY_LLAMA / "model.safetensors"), framework="numpy") as f:
        expected = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # safetensors' own reading
    assert ckpt.parameters == expected
    assert ckpt.context_length == 512
    verify_data(ckpt)
    needed = fit_check(ckpt, free_bytes=64 * GIB)
    assert needed == -(-ckpt.weight_bytes * 12 // 10)  # weights x 1.2, rounded up


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_70b_folder(folder: Path) -> Path:
    """tiny-llama's tokenizer files, a 70B Llama config and a safetensors file holding only a header that claims
    its tensors (no data)."""
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, folder / name)
    hidden, inter, layers, vocab, kv = 8192, 28672, 80, 128256, 8
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 64,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 8192}
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
              "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [kv * 128, hidden],
                   p + "self_attn.v_proj.weight": [kv * 128, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                   p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                   p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
                   p + "post_attention_layernorm.weight": [hidden]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    return folder


def test_a_header_claiming_70b_parameters_does_not_fit_and_says_by_how_much(tmp_path: Path) -> None:
    ckpt = inspect_checkpoint(llama_70b_folder(tmp_path / "big"))
    assert 70.0e9 < ckpt.parameters < 71.0e9 and ckpt.bytes_per_parameter == 2
    with pytest.raises(FitError) as err:
        fit_check(ckpt, free_bytes=64 * GIB)
    e = err.value
    assert e.status == 422 and e.needed == -(-ckpt.parameters * 2 * 12 // 10) and e.free == 64 * GIB
    assert f"{ckpt.parameters:,} parameters x 2 bytes per parameter x 1.2 headroom" in str(e)
    assert f"{e.needed - e.free:,} bytes" in str(e) and "too many" in str(e)
    # with room enough, the missing tensor bytes are caught before anything reads them
    fit_check(ckpt, free_bytes=200 * 10**9)
    with pytest.raises(UploadError, match=r"data_offsets .* do not hold"):
        verify_data(ckpt)


@pytest.mark.parametrize(("name", "fields"), [
    ("../evil.txt", {}),
    ("my-upload/../../evil.txt", {}),
    ("/tmp/evil.txt", {}),
    ("my-upload/link", {"type": tarfile.SYMTYPE, "linkname": "../../etc/passwd"}),
    ("my-upload/abs-link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
    ("my-upload/hard", {"type": tarfile.LNKTYPE, "linkname": "../outside"}),
])
def test_an_archive_member_leaving_its_folder_is_refused_and_nothing_is_written(
        tmp_path: Path, name: str, fields: dict[str, object]) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, "my-upload/config.json", b"{}")
        add_bytes(tar, name, b"pwned", **fields)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UploadError, match=r"leaves the upload's folder|links outside the upload's folder") as err:
        check_archive(path, max_unpacked=1 << 20)
    assert err.value.status == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing unpacked anywhere
    assert not Path("/tmp/evil.txt").exists()


def test_the_data_filter_guards_extraction_too(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, "my-upload/config.json", b"{}")
        add_bytes(tar, "../evil.txt", b"pwned")
    with pytest.raises(UploadError, match="could not be unpacked"):
        extract(path, tmp_path / "dest", ["my-upload/config.json"])  # even if the member check were skipped
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "dest").exists()


def test_config_sanity(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_LLAMA, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(UploadError, match="num_key_value_heads 3 must divide num_attention_heads 8") as err:
        inspect_checkpoint(folder)
    assert err.value.param == "config.json"
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(UploadError, match=r"model.embed_tokens.weight has shape \[4096, 256\], config.json says"):
        inspect_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2"]}))
    with pytest.raises(UploadError, match="only Llama checkpoints"):
        inspect_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UploadError, match=r"no tokenizer\.json"):
        inspect_checkpoint(folder)


async def test_receive_hashes_and_refuses_past_the_limit(tmp_path: Path) -> None:
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 1000

    got = await receive(chunks(3), tmp_path, max_bytes=3000)
    assert got.size == 3000 and got.path.read_bytes() == b"x" * 3000
    assert got.sha256 == hashlib.sha256(b"x" * 3000).hexdigest()
    with pytest.raises(UploadError, match="larger than the limit of 3000 bytes") as err:
        await receive(chunks(4), tmp_path / "second", max_bytes=3000)
    assert err.value.status == 413 and list((tmp_path / "second").iterdir()) == []
