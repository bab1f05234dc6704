"""``POST /admin/models/upload``: an admin uploads a Hugging Face Llama checkpoint as a tarball; it is checked before
anything loads it, then added to the catalog, and the executors render and load it (docs/model-control.md).

    curl -X POST "$EDGE/admin/models/upload?id=my-upload&input_per_million=0.20&output_per_million=0.80" \\
         -H "Authorization: Bearer $INFERPLANE_ADMIN_KEY" -H 'Content-Type: application/gzip' \\
         --data-binary @my-upload.tar.gz

The body is streamed to disk (``max_upload_bytes``, 413 beyond) with its sha256, then: archive paths (no absolute
path, no ``..``, no link out: 400, nothing unpacked), the checkpoint (config sanity, every safetensors header:
400), the fit check (parameters x bytes per parameter x 1.2 against the executor's free RAM: 422 with the numbers),
the tensors' bytes; then metering's ``CreateModel`` with the unpacked folder as checkpoint and tokenizer.

``?kind=triton``: a Triton model directory (config.pbtxt, numeric version folders with a model.py, Python backend),
priced ``per_request`` only and reached through the KServe v2 protocol (task ``infer``). After the same archive
checks: config.pbtxt parsed and checked (its name, the Python backend, nothing needing other binaries: 400), each
version's model.py, the fit check on the served version folders' bytes x 1.2 (422); then ``CreateModel`` with the
folder as ``triton_dir``, which the executors copy into their repository and load.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inferplane.common import model_upload as mu
from inferplane.common import triton_upload as tu
from inferplane.gateway.admin_models import model_dict
from inferplane.gateway.errors import GatewayError
from inferplane.v1 import metering_pb2

UPLOAD_PATH = "/admin/models/upload"
CHECKPOINT, TRITON = "checkpoint", "triton"  # ?kind=: a Hugging Face Llama checkpoint, a Triton model directory
KINDS = (CHECKPOINT, TRITON)
# A model id that is also a folder name and a Triton model name
UPLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def add_upload_route(router: APIRouter, call: Callable[[Request, str, Any], Awaitable[Any]], *,
                     require_admin: Callable[[Request], Awaitable[None]], nanos: Callable[[str, str], int],
                     price_dict: Callable[[metering_pb2.Price], dict[str, Any]], iso: Callable[[Any], str | None],
                     uploads_dir: Path, max_upload_bytes: int,
                     free_memory: Callable[[], int] = mu.available_memory) -> None:
    @router.post(UPLOAD_PATH)
    async def upload_model(request: Request, id: str = "", input_per_million: str | None = None,
                           output_per_million: str | None = None, per_request: str | None = None,
                           owned_by: str = "", kind: str = CHECKPOINT) -> Response:
        await require_admin(request)
        if not UPLOAD_ID.match(id):
            raise GatewayError(400, "Give the model's id as ?id=..., letters, digits, '.', '_' or '-' (at most 128).",
                               param="id")
        if kind not in KINDS:
            raise GatewayError(400, f"kind {kind!r}: give kind=checkpoint (a Hugging Face Llama checkpoint, the "
                                    "default) or kind=triton (a Triton model directory, Python backend).", param="kind")
        if kind == TRITON:
            # reached through the KServe v2 protocol, which carries no tokens: priced per request only
            for name, value in (("input_per_million", input_per_million), ("output_per_million", output_per_million)):
                if value is not None and nanos(value, name):
                    raise GatewayError(400, f"{name}: a Triton model directory is priced per request only (its calls "
                                            "carry no tokens); give per_request.", param=name)
            if per_request is None:
                raise GatewayError(400, "per_request: a Triton model directory is priced per request; give "
                                        "?per_request=USD (0, or 0.000001 to 0.50).", param="per_request")
        price = metering_pb2.PriceAmounts(
            input_per_million_nanodollars=nanos(input_per_million or "0", "input_per_million"),
            output_per_million_nanodollars=nanos(output_per_million or "0", "output_per_million"),
            per_request_nanodollars=nanos(per_request or "0", "per_request"))
        try:
            received = await mu.receive(request.stream(), uploads_dir / ".incoming", max_upload_bytes)
        except mu.UploadError as exc:
            raise GatewayError(exc.status, str(exc), param=exc.param) from None
        dest = uploads_dir / f"{id}-{received.sha256[:12]}"
        check = _check_triton_dir if kind == TRITON else _check
        try:
            report = await asyncio.to_thread(check, received, dest, max_upload_bytes * 4, free_memory, id)
        except mu.UploadError as exc:
            raise GatewayError(exc.status, str(exc), param=exc.param,
                               code="model_does_not_fit" if isinstance(exc, mu.FitError) else None) from None
        finally:
            received.path.unlink(missing_ok=True)
        folder = Path(report["folder"])
        if kind == TRITON:
            # the catalog requires a tokenizer folder; the KServe protocol never tokenizes (as minilm-raw's)
            spec = {"tasks": ["infer"], "triton_dir": str(folder), "tokenizer": str(folder),
                    "owned_by": owned_by or "uploaded"}
        else:
            spec = {"tasks": ["chat", "completion"], "checkpoint": str(folder), "tokenizer": str(folder),
                    "context_length": report["context_length"], "owned_by": owned_by or "uploaded"}
        req = metering_pb2.CreateModelRequest(id=id, spec_json=json.dumps(spec), versions={1: id}, price=price)
        try:
            resp = await call(request, "CreateModel", req)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, dest, True)  # an id in use, metering down: leave nothing behind
            raise
        upload = {"kind": kind, **{k: v for k, v in report.items() if k != "context_length"}}
        return JSONResponse({**model_dict(resp.model, price_dict, iso), "catalog_version": resp.catalog_version,
                             "upload": upload}, status_code=201)


def _check(received: mu.Received, dest: Path, max_unpacked: int, free_memory: Callable[[], int],
           model_id: str) -> dict[str, Any]:
    """Every check of a checkpoint, in order; ``dest`` removed when one fails."""
    files = mu.check_archive(received.path, max_unpacked=max_unpacked)
    if dest.exists():
        shutil.rmtree(dest)  # the same bytes uploaded again under the same id (a failed registration before)
    folder = mu.extract(received.path, dest, files)
    try:
        ckpt = mu.inspect_checkpoint(folder)
        free = free_memory()
        needed = mu.fit_check(ckpt, free)
        mu.verify_data(ckpt)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return {"sha256": received.sha256, "bytes": received.size, "folder": str(folder), "parameters": ckpt.parameters,
            "dtypes": ckpt.dtypes, "bytes_per_parameter": ckpt.bytes_per_parameter, "needed_bytes": needed,
            "free_bytes": free, "context_length": ckpt.context_length}


def _check_triton_dir(received: mu.Received, dest: Path, max_unpacked: int, free_memory: Callable[[], int],
                      model_id: str) -> dict[str, Any]:
    """Every check of a Triton model directory, in order; ``dest`` removed when one fails."""
    files = mu.check_archive(received.path, max_unpacked=max_unpacked)
    if dest.exists():
        shutil.rmtree(dest)
    folder = tu.extract(received.path, dest, files)
    try:
        tdir = tu.inspect_triton_dir(folder, model_id)
        free = free_memory()
        needed = tu.fit_check(tdir, free)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return {"sha256": received.sha256, "bytes": received.size, "folder": str(folder), "backend": tdir.config.backend,
            "versions": tdir.versions, "served_versions": tdir.served, "weight_bytes": tdir.weight_bytes,
            "needed_bytes": needed, "free_bytes": free}
