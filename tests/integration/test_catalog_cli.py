"""``inferplane models list|register|set|set-price|delete`` on a real store file (the stack need not run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferplane.assets import CATALOG
from inferplane.common.catalog import load_catalog
from tests.integration.test_metering_admin import cli, config  # noqa: F401  (fixture)


def listed(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, dict[str, object]]:  # noqa: F811
    capsys.readouterr()
    assert cli("models", "list", "--json", "--config", str(config)) == 0
    return {m["id"]: m for m in json.loads(capsys.readouterr().out)["models"]}


def test_register_set_price_change_and_delete(config: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    first = listed(capsys, config)
    assert set(first) == {m.id for m in load_catalog(CATALOG).models}  # seeded from the shipped catalog
    assert cli("models", "register", "my-finetune", "--triton-model", "tiny-llama", "--input", "0.20", "--output",
               "0.80", "--set", "owned_by=acme", "--config", str(config)) == 0
    assert "registered my-finetune: version 1 on Triton model tiny-llama" in capsys.readouterr().out
    model = listed(capsys, config)["my-finetune"]
    assert (model["triton_model"], model["owned_by"], model["tokenizer"]) == ("tiny-llama", "acme", "models/tiny-llama")
    assert model["price"] == {"input_per_million": "0.2", "cached_input_per_million": "0.2",
                              "output_per_million": "0.8", "per_request": "0",
                              "version": model["price"]["version"]}  # type: ignore[index]
    assert cli("models", "set-price", "my-finetune", "--cached-input", "0.05", "--config", str(config)) == 0
    assert cli("models", "set-price", "my-finetune", "--per-request", "0.001", "--config", str(config)) == 0
    model = listed(capsys, config)["my-finetune"]
    assert model["price"]["input_per_million"] == "0.2" and model["price"]["per_request"] == "0.001"  # type: ignore[index]
    assert model["price"]["cached_input_per_million"] == "0.05"  # type: ignore[index]  # kept by a later set-price
    assert cli("models", "set-price", "my-finetune", "--input", "0.01", "--config", str(config)) == 0
    model = listed(capsys, config)["my-finetune"]
    assert model["price"]["cached_input_per_million"] == "0.01"  # type: ignore[index]  # not above the input price
    assert cli("models", "set", "my-finetune", "--version", "2=tiny-llama", "--serve", "2", "--set",
               "context_length=256", "--config", str(config)) == 0
    model = listed(capsys, config)["my-finetune"]
    assert (model["version"], model["versions"], model["context_length"]) == (2, {"1": "tiny-llama",
                                                                                  "2": "tiny-llama"}, 256)
    # errors: exit 2 for bad input, 1 for an unknown model; nothing changes
    assert cli("models", "register", "my-finetune", "--triton-model", "tiny-llama", "--config", str(config)) == 1
    assert cli("models", "register", "bad", "--triton-model", "tiny-llama", "--set", "context_length=-1",
               "--config", str(config)) == 2
    assert cli("models", "set-price", "my-finetune", "--per-request", "0.0000001", "--config", str(config)) == 2
    assert cli("models", "delete", "no-such-model", "--config", str(config)) == 1
    capsys.readouterr()
    assert cli("models", "delete", "my-finetune", "--config", str(config)) == 0
    assert "deleted my-finetune" in capsys.readouterr().out
    assert "my-finetune" not in listed(capsys, config) and "bad" not in listed(capsys, config)
