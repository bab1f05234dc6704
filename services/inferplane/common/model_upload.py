"""Check an uploaded Hugging Face Llama checkpoint (a tarball) before anything loads it.

    receive(chunks, folder, max_bytes)  -> Received(path, sha256, size)     streamed to disk, size-limited
    check_archive(tar_path)             -> the members' plan (no traversal, no absolute path, no link out)
    extract(tar_path, dest, plan)       -> the checkpoint folder (config.json's folder) inside dest
    inspect_checkpoint(folder)          -> Checkpoint (config sanity, safetensors headers, parameter count)
    fit_check(checkpoint, free_bytes)   -> FitError when parameters x bytes per parameter x 1.2 > free memory

Each refusal is an ``UploadError`` with the offending ``param`` and a message that says what is wrong and by how
much, for a 4xx. Nothing here imports torch or safetensors: a safetensors file is an 8-byte little-endian header
length, a JSON header (``{"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``) and the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import posixpath
import shutil
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

# Headroom over the weights for the KV cache and the runtime (the 15-20 % sizing rule).
HEADROOM = 1.2
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_MEMBERS = 10_000
REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json")
LLAMA_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings")


class UploadError(ValueError):
    """An upload refused before anything loads it: ``status`` (400, 413, 422), ``param``, the reason."""

    def __init__(self, message: str, *, param: str = "file", status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class FitError(UploadError):
    """The model does not fit the executor's free memory."""

    def __init__(self, message: str, *, needed: int, free: int) -> None:
        super().__init__(message, param="file", status=422)
        self.needed, self.free = needed, free


@dataclass(frozen=True, slots=True)
class Received:
    path: Path
    sha256: str
    size: int


async def receive(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> Received:
    """Write ``chunks`` to a new file in ``folder`` with its sha256; past ``max_bytes`` the file is removed and the
    upload refused (413)."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    path = folder / f".incoming-{os.urandom(8).hex()}.tar"
    digest, size = hashlib.sha256(), 0
    out = await asyncio.to_thread(path.open, "wb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise UploadError(f"the upload is larger than the limit of {max_bytes} bytes", status=413)
            digest.update(chunk)
            await asyncio.to_thread(out.write, chunk)  # the disk's pace, off the event loop
    except BaseException:
        out.close()
        path.unlink(missing_ok=True)
        raise
    out.close()
    if size == 0:
        path.unlink(missing_ok=True)
        raise UploadError("the upload is empty: send the checkpoint's tarball as the request body")
    return Received(path, digest.hexdigest(), size)


def _inside(name: str) -> str | None:
    """``name`` normalised when it stays inside the archive's folder, else None."""
    if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or norm.startswith("/"):
        return None
    return norm


def check_archive(tar_path: Path, *, max_unpacked: int) -> list[str]:
    """The regular files of the tarball (normalised names), after refusing any member with an absolute path, a
    ``..`` that leaves the folder, a link whose target leaves it, or a device or fifo; and an archive that would
    unpack to more than ``max_unpacked`` bytes."""
    try:
        tar = tarfile.open(tar_path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UploadError(f"not a tar archive (plain or gzip/bz2/xz-compressed): {exc}") from None
    files, total = [], 0
    with tar:
        for n, member in enumerate(tar):
            if n >= MAX_MEMBERS:
                raise UploadError(f"the archive has more than {MAX_MEMBERS} members")
            norm = _inside(member.name)
            if norm is None:
                raise UploadError(f"archive member {member.name!r} leaves the upload's folder (absolute path or '..')")
            if member.issym() or member.islnk():
                base = posixpath.dirname(norm) if member.issym() else ""
                if _inside(posixpath.join(base, member.linkname)) is None or member.linkname.startswith("/"):
                    raise UploadError(f"archive member {member.name!r} links outside the upload's folder "
                                      f"(-> {member.linkname!r})")
            elif member.isfile():
                total += member.size
                if total > max_unpacked:
                    raise UploadError(f"the archive unpacks to more than {max_unpacked} bytes", status=413)
                files.append(norm)
            elif not member.isdir():
                raise UploadError(f"archive member {member.name!r} is not a file, folder or link")
    return files


def extract(tar_path: Path, dest: Path, files: list[str], *, marker: str = "config.json",
            expected: str = "a Hugging Face checkpoint folder is expected") -> Path:
    """Unpack into ``dest`` (Python's ``data`` filter as a second guard) and return the folder holding
    ``marker`` (config.json: the archive's root, or its one top folder)."""
    configs = sorted((f for f in files if posixpath.basename(f) == marker), key=lambda f: f.count("/"))
    if not configs:
        hint = ""
        if marker == "config.json" and any(posixpath.basename(f) == "config.pbtxt" for f in files):
            hint = "; it has a config.pbtxt: upload a Triton model directory with kind=triton"
        raise UploadError(f"the archive has no {marker} ({expected}){hint}")
    dest.mkdir(parents=True, exist_ok=False)
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UploadError(f"the archive could not be unpacked: {exc}") from None
    return (dest / posixpath.dirname(configs[0])).resolve()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    folder: Path
    config: dict[str, object]
    parameters: int  # elements of every tensor of every safetensors file
    weight_bytes: int  # their bytes as stored
    dtypes: dict[str, int]  # dtype -> parameters stored in it
    context_length: int

    @property
    def bytes_per_parameter(self) -> float:
        return self.weight_bytes / self.parameters if self.parameters else 0.0


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors header."""

    dtype: str
    shape: list[int]
    offsets: object  # data_offsets as written ([begin, end] when well formed)

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * DTYPE_BYTES[self.dtype]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file's header (``__metadata__`` left out); ``UploadError`` when malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UploadError(f"{path.name}: not a safetensors file (shorter than its header length)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise UploadError(f"{path.name}: safetensors header length {n} is past the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UploadError(f"{path.name}: the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise UploadError(f"{path.name}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, t in header.items():
        if (not isinstance(t, dict) or t.get("dtype") not in DTYPE_BYTES or not isinstance(t.get("shape"), list)
                or not all(isinstance(d, int) and d >= 0 for d in t["shape"])):
            raise UploadError(f"{path.name}: tensor {name!r} has no valid dtype and shape ({t!r:.200})")
    return {name: TensorInfo(t["dtype"], list(t["shape"]), t.get("data_offsets")) for name, t in header.items()}


def _positive_int(config: dict[str, object], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UploadError(f"config.json: {key} must be a positive integer (got {value!r})", param="config.json")
    return value


def inspect_checkpoint(folder: Path) -> Checkpoint:
    """Config sanity (a Llama: the sizes positive and consistent) and every safetensors header parsed."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            raise UploadError(f"the checkpoint has no {name} (needed: {', '.join(REQUIRED)} and *.safetensors)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UploadError(f"config.json is not JSON: {exc}", param="config.json") from None
    if not isinstance(config, dict):
        raise UploadError("config.json is not a JSON object", param="config.json")
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in (config.get("architectures") or []):
        raise UploadError(f"config.json: only Llama checkpoints are served (model_type {config.get('model_type')!r})",
                          param="config.json")
    ints = {key: _positive_int(config, key) for key in LLAMA_INTS}
    heads = ints["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise UploadError(f"config.json: num_key_value_heads {kv_heads!r} must divide num_attention_heads {heads}",
                          param="config.json")
    if "head_dim" not in config and ints["hidden_size"] % heads:
        raise UploadError(f"config.json: hidden_size {ints['hidden_size']} is not a multiple of num_attention_heads "
                          f"{heads}", param="config.json")
    chat = json.loads((folder / "tokenizer_config.json").read_text() or "{}")
    if not isinstance(chat, dict) or not chat.get("chat_template"):
        raise UploadError("tokenizer_config.json has no chat_template", param="tokenizer_config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UploadError("the checkpoint has no *.safetensors file")
    parameters = weight_bytes = 0
    dtypes: dict[str, int] = {}
    for path in files:
        for name, t in read_safetensors_header(path).items():
            parameters += t.count
            weight_bytes += t.nbytes
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.count
            if name == "model.embed_tokens.weight" and t.shape != [ints["vocab_size"], ints["hidden_size"]]:
                raise UploadError(f"{path.name}: {name} has shape {t.shape}, config.json says "
                                  f"[{ints['vocab_size']}, {ints['hidden_size']}]", param="config.json")
    return Checkpoint(folder, config, parameters, weight_bytes, dtypes, ints["max_position_embeddings"])


def fit_check(ckpt: Checkpoint, free_bytes: int, *, where: str = "the executor's free RAM") -> int:
    """The bytes the model needs (weights x ``HEADROOM``); ``FitError`` when more than ``free_bytes``."""
    needed = math.ceil(ckpt.weight_bytes * HEADROOM)
    if needed > free_bytes:
        raise FitError(
            f"the model does not fit: {ckpt.parameters:,} parameters x {ckpt.bytes_per_parameter:g} bytes per "
            f"parameter x {HEADROOM} headroom = {needed:,} bytes ({needed / 2**30:.2f} GiB), but {where} is "
            f"{free_bytes:,} bytes ({free_bytes / 2**30:.2f} GiB): {needed - free_bytes:,} bytes "
            f"({(needed - free_bytes) / 2**30:.2f} GiB) too many", needed=needed, free=free_bytes)
    return needed


def verify_data(ckpt: Checkpoint) -> None:
    """After the fit check: every tensor's bytes are in its file (a header claiming more than the file holds is
    refused here, before Triton reads it)."""
    for path in sorted(ckpt.folder.glob("*.safetensors")):
        header = read_safetensors_header(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        data = path.stat().st_size - 8 - n
        for name, t in header.items():
            offsets, want = t.offsets, t.nbytes
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                    or offsets[1] - offsets[0] != want or not 0 <= offsets[0] <= offsets[1] <= data):
                raise UploadError(f"{path.name}: tensor {name!r}: data_offsets {offsets} do not hold its {want} bytes "
                                  f"within the file's {data} data bytes")


def available_memory() -> int:
    """This machine's available RAM (``MemAvailable``), the executor's free memory on the CPU when it runs here."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")
