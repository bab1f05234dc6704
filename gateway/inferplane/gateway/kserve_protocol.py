"""KServe v2 over HTTP ↔ ``inference.GRPCInferenceService`` messages, with Triton's binary tensor data extension.

A request body is JSON, or (binary extension) a JSON header of ``Inference-Header-Content-Length`` bytes followed by
the raw bytes of the inputs whose ``parameters.binary_data_size`` says how many, in the order of ``inputs``. Every
input becomes one ``raw_input_contents`` entry of the gRPC request (little-endian, row-major; BYTES elements each
prefixed by its 4-byte little-endian length, as Triton lays them out). ``binary_data`` (per output) and
``binary_data_output`` (per request) are this edge's to honour and are not forwarded; every other parameter is.
An answer's outputs go out as JSON ``data``, or, where binary was asked for, as bytes after the JSON header with
``binary_data_size`` (``binary_data_output`` defaults to false, as in Triton's HTTP server).

Everything this edge does not understand is a 400, never ignored.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from inferplane.gateway.errors import GatewayError

HEADER_LENGTH = "inference-header-content-length"
# numpy's dtype of each fixed-size datatype (little-endian, as the wire is)
NUMPY_DTYPES: Mapping[str, str] = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
BINARY_ONLY = frozenset({"BF16"})  # no JSON spelling: binary data only
DATATYPES = frozenset({*NUMPY_DTYPES, "BYTES", *BINARY_ONLY})
REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OUTPUT_FIELDS = frozenset({"name", "parameters"})
BINARY_DATA_SIZE, BINARY_DATA, BINARY_DATA_OUTPUT = "binary_data_size", "binary_data", "binary_data_output"


def bad(message: str) -> GatewayError:
    return GatewayError(400, message)


@dataclass(slots=True)
class InferCall:
    """A parsed HTTP inference request: the gRPC request, and how each output is to come back."""

    request: service_pb2.ModelInferRequest
    binary_default: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


# --- parameters ---------------------------------------------------------------------------------------------

def set_parameter(target: Any, key: str, value: object, where: str) -> None:
    """A JSON parameter into a ``map<string, InferParameter>``."""
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise bad(f"'{where}.{key}' is out of the 64-bit integer range.")
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise bad(f"'{where}.{key}' must be a boolean, a number or a string.")


def parameters_json(params: Any) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as JSON."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
    return out


def _object(value: object, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(f"'{where}' must be a JSON object.")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise bad(f"Unknown parameter: '{where}.{unknown[0]}'." if where else f"Unknown parameter: '{unknown[0]}'.")
    return value


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"'{where}' must be a JSON object.")
    return value


# --- request ------------------------------------------------------------------------------------------------

def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header and the binary part that follows it."""
    size = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > size:
            raise bad(f"'Inference-Header-Content-Length' must be a byte count of at most {size} (the body's).")
        size = int(header_length)
    try:
        header = json.loads(body[:size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("We could not parse the JSON header of your request.") from None
    return header, memoryview(body)[size:]


def _flat(data: object) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item))
    return out


def _bytes_elements(values: list[Any], where: str) -> bytes:
    parts = []
    for value in values:
        if not isinstance(value, str):
            raise bad(f"'{where}' holds BYTES: each element must be a string.")
        encoded = value.encode()
        parts.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(parts)


def _json_tensor(data: object, datatype: str, count: int, where: str) -> bytes:
    """An input's JSON ``data`` as the raw bytes Triton reads."""
    if datatype in BINARY_ONLY:
        raise bad(f"'{where}': {datatype} tensors must be sent as binary data.")
    values = _flat(data)
    if len(values) != count:
        raise bad(f"'{where}' has {len(values)} elements; its shape holds {count}.")
    if datatype == "BYTES":
        return _bytes_elements(values, where)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise bad(f"'{where}' holds BOOL: each element must be true or false.")
    elif any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise bad(f"'{where}' holds {datatype}: each element must be a number.")
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    if dtype.kind in "iu":
        if any(isinstance(v, float) for v in values):
            raise bad(f"'{where}' holds {datatype}: each element must be an integer.")
        limits = np.iinfo(dtype)
        if any(not limits.min <= v <= limits.max for v in values):  # numpy would wrap them silently
            raise bad(f"'{where}': a value does not fit {datatype} ({limits.min} to {limits.max}).")
        return np.array(values, dtype=dtype).tobytes()
    array = np.array(values, dtype=np.float64)
    with np.errstate(over="ignore"):  # an overflow becomes ±inf, refused just below
        narrowed = array.astype(dtype)
    if not np.isfinite(array).all() or not np.isfinite(narrowed).all():  # NaN, ±inf, or too large for the type
        raise bad(f"'{where}': a value does not fit {datatype} (finite numbers only).")
    return narrowed.tobytes()


def infer_call(body: bytes, header_length: str | None, *, model: str, version: str = "") -> InferCall:
    """Parse a ``POST /v2/models/{model}[/versions/{version}]/infer`` body."""
    header, binary = split_body(body, header_length)
    header = _object(header, "", REQUEST_FIELDS)
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    call = InferCall(req)
    if "id" in header:
        if not isinstance(header["id"], str):
            raise bad("'id' must be a string.")
        req.id = header["id"]
    for key, value in _parameters(header.get("parameters"), "parameters").items():
        if key == BINARY_DATA_OUTPUT:
            if not isinstance(value, bool):
                raise bad(f"'parameters.{BINARY_DATA_OUTPUT}' must be a boolean.")
            call.binary_default = value
        else:
            set_parameter(req.parameters, key, value, "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("'inputs' must be a non-empty list of tensors.")
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        item = _object(item, where, INPUT_FIELDS)
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not name:
            raise bad(f"'{where}.name' must be a non-empty string.")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"'{where}.shape' must be a list of non-negative integers.")
        if datatype not in DATATYPES:
            raise bad(f"'{where}.datatype' must be one of {', '.join(sorted(DATATYPES))}.")
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        size: int | None = None
        for key, value in _parameters(item.get("parameters"), f"{where}.parameters").items():
            if key == BINARY_DATA_SIZE:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise bad(f"'{where}.parameters.{BINARY_DATA_SIZE}' must be a non-negative integer.")
                size = value
            else:
                set_parameter(tensor.parameters, key, value, f"{where}.parameters")
        if size is not None:
            if "data" in item:
                raise bad(f"'{where}' has both 'data' and '{BINARY_DATA_SIZE}': give one.")
            if offset + size > len(binary):
                raise bad(f"'{where}.parameters.{BINARY_DATA_SIZE}' ({size}) goes past the end of the body.")
            req.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            req.raw_input_contents.append(_json_tensor(item["data"], datatype, math.prod(shape), f"{where}.data"))
        else:
            raise bad(f"'{where}' needs 'data' or the binary data extension's '{BINARY_DATA_SIZE}'.")
    if offset != len(binary):
        raise bad(f"The body holds {len(binary) - offset} bytes after the inputs' binary data.")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise bad("'outputs' must be a list.")
    for i, item in enumerate(outputs):
        where = f"outputs[{i}]"
        item = _object(item, where, OUTPUT_FIELDS)
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"'{where}.name' must be a non-empty string.")
        tensor = req.outputs.add(name=name)
        for key, value in _parameters(item.get("parameters"), f"{where}.parameters").items():
            if key == BINARY_DATA:
                if not isinstance(value, bool):
                    raise bad(f"'{where}.parameters.{BINARY_DATA}' must be a boolean.")
                call.binary_outputs[name] = value
            else:
                set_parameter(tensor.parameters, key, value, f"{where}.parameters")
    return call


# --- response -----------------------------------------------------------------------------------------------

def _bytes_values(raw: bytes, name: str) -> list[str]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise GatewayError(502, f"Output '{name}' is not a well-formed BYTES tensor.", type="server_error")
        (n,) = struct.unpack_from("<I", raw, i)
        try:
            out.append(raw[i + 4:i + 4 + n].decode())
        except UnicodeDecodeError:
            raise bad(f"Output '{name}' holds bytes that are not UTF-8 text: ask for it with "
                      f"'{BINARY_DATA}': true.") from None
        i += 4 + n
    return out


def _json_values(raw: bytes, datatype: str, name: str) -> list[Any]:
    if datatype == "BYTES":
        return _bytes_values(raw, name)
    if datatype not in NUMPY_DTYPES:
        raise bad(f"Output '{name}' is {datatype}, which has no JSON form: ask for it with '{BINARY_DATA}': true.")
    values: list[Any] = np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).tolist()
    return values


def infer_response(resp: service_pb2.ModelInferResponse, call: InferCall) -> tuple[bytes, int | None]:
    """The response body, and its JSON header's length when binary data follows it (else None)."""
    if resp.raw_output_contents and len(resp.raw_output_contents) != len(resp.outputs):
        raise GatewayError(502, "The model's answer has outputs without their data.", type="server_error")
    outputs, binaries = [], []
    for i, out in enumerate(resp.outputs):
        raw = resp.raw_output_contents[i] if resp.raw_output_contents else b""
        item: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        params = parameters_json(out.parameters)
        if call.binary(out.name):
            params[BINARY_DATA_SIZE] = len(raw)
            binaries.append(raw)
        else:
            item["data"] = _json_values(raw, out.datatype, out.name)
        if params:
            item["parameters"] = params
        outputs.append(item)
    body: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        body["id"] = resp.id
    if resp.parameters:
        body["parameters"] = parameters_json(resp.parameters)
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not binaries:
        return header, None
    return header + b"".join(binaries), len(header)


# --- metadata -----------------------------------------------------------------------------------------------

def _tensors(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def metadata_body(resp: service_pb2.ModelMetadataResponse) -> dict[str, Any]:
    return {"name": resp.name, "versions": list(resp.versions), "platform": resp.platform,
            "inputs": _tensors(resp.inputs), "outputs": _tensors(resp.outputs)}
