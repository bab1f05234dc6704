"""Validate JSON against the component schemas of OpenAI's own OpenAPI description, offline.

``validate(instance, "CreateChatCompletionResponse")`` raises ``jsonschema.ValidationError``;
``is_valid`` answers a bool. The description is ``../shared/schemas/openai-openapi.yaml`` beside the
clone; where it is absent a test skips with the reason (and fails under ``CI=true``).

The file says ``openapi: 3.1.0`` (JSON Schema 2020-12) but still carries OpenAPI 3.0 keywords, so the
document is preprocessed once before it is used (``_preprocess``):

* ``nullable: true`` becomes ``anyOf: [<the schema without nullable>, {"type": "null"}]`` (a sibling
  ``$ref`` or ``enum`` stays in the first branch, so ``null`` is accepted next to it); ``nullable: false``
  is dropped.
* OpenAPI 3.0's boolean ``exclusiveMinimum``/``exclusiveMaximum`` become the 2020-12 numeric form (the
  bound moves over from ``minimum``/``maximum``).
* Other OpenAPI keywords (``discriminator``, ``x-*``, ``example``) are annotations the validator ignores;
  ``format`` is not asserted.

``$ref``s resolve within the document (it is registered as one ``referencing`` resource).

One schema is derived, because the spec has none for it: ``CreateCompletionStreamResponse`` is
``CreateCompletionResponse`` with ``choices[].finish_reason`` and ``usage`` nullable. The spec says the
streamed and non-streamed completion objects "share the same shape", but OpenAI sends
``finish_reason: null`` on every chunk but the last and, with ``stream_options.include_usage``,
``usage: null`` on every chunk but the usage chunk (as its own ``stream_options`` documentation says).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMA_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "openai-openapi.yaml"
_URI = "urn:openai:openapi"
DERIVED_STREAM_COMPLETION = "CreateCompletionStreamResponse"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _preprocess(node: Any) -> Any:
    """OpenAPI 3.0 leftovers → JSON Schema 2020-12 (see the module docstring)."""
    if isinstance(node, list):
        return [_preprocess(item) for item in node]
    if not isinstance(node, dict):
        return node
    # ``nullable`` as a keyword has a bool value (a property that happens to be named so has a schema).
    out = {key: _preprocess(value) for key, value in node.items()
           if not (key == "nullable" and isinstance(value, bool))}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(bound)
        if isinstance(flag, bool):
            del out[bound]
            if flag and limit in out:
                out[bound] = out.pop(limit)
    if node.get("nullable") is True:
        return _nullable(out)
    return out


def _derive(schemas: dict[str, Any]) -> None:
    if DERIVED_STREAM_COMPLETION in schemas:  # a later spec revision may define it itself
        return
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = _nullable(choice["properties"]["finish_reason"])
    chunk["properties"]["usage"] = _nullable(chunk["properties"]["usage"])
    schemas[DERIVED_STREAM_COMPLETION] = chunk


def _schema_file() -> Path:
    if not SCHEMA_PATH.is_file():
        reason = f"OpenAI OpenAPI description not found at {SCHEMA_PATH} (shared/ lies beside the clone in CI)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return SCHEMA_PATH


@functools.cache
def _registry() -> tuple[Registry[Any], dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader parses the 3 MB file in ~1 s
    with _schema_file().open(encoding="utf-8") as f:
        document = yaml.load(f, Loader=loader)
    document = {"components": _preprocess(document["components"])}
    schemas: dict[str, Any] = document["components"]["schemas"]
    _derive(schemas)
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    return Registry().with_resource(_URI, resource), schemas


@functools.cache
def _validator(component: str) -> jsonschema.Draft202012Validator:
    registry, schemas = _registry()
    if component not in schemas:
        raise KeyError(f"no component schema {component!r} in {SCHEMA_PATH.name}")
    return jsonschema.Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{component}"}, registry=registry)


def validate(instance: Any, component_name: str) -> None:
    """Raise ``jsonschema.ValidationError`` (the most relevant one) unless ``instance`` fits the component."""
    error = jsonschema.exceptions.best_match(_validator(component_name).iter_errors(instance))
    if error is not None:
        raise error


def is_valid(instance: Any, component_name: str) -> bool:
    return bool(_validator(component_name).is_valid(instance))
