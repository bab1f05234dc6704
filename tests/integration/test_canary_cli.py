"""``inferplane models traffic|promote|rollback`` on a real store file (the stack need not run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_catalog_cli import listed
from tests.integration.test_metering_admin import cli, config  # noqa: F401  (fixture)


def test_split_promote_and_roll_back(config: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    at = ("--config", str(config))
    assert cli("models", "register", "my-model", "--triton-model", "tiny-llama", *at) == 0
    assert cli("models", "set", "my-model", "--version", "2=tiny-llama", *at) == 0
    capsys.readouterr()
    assert cli("models", "traffic", "my-model", "1=90", "2=10", *at) == 0
    assert "split my-model: version 1 on Triton model tiny-llama, traffic 1=90 2=10" in capsys.readouterr().out
    assert listed(capsys, config)["my-model"]["traffic"] == {"1": 90, "2": 10}
    capsys.readouterr()
    assert cli("models", "list", *at) == 0
    assert "1=90 2=10" in capsys.readouterr().out
    # refused, nothing changes: a sum other than 100, an unknown version, not N=PERCENT
    assert cli("models", "traffic", "my-model", "1=90", "2=20", *at) == 2
    assert "sum to 110" in capsys.readouterr().err
    assert cli("models", "traffic", "my-model", "1=90", "3=10", *at) == 2
    assert cli("models", "traffic", "my-model", "1=ninety", *at) == 2
    assert cli("models", "traffic", "no-such-model", "1=100", *at) == 1
    assert listed(capsys, config)["my-model"]["traffic"] == {"1": 90, "2": 10}

    assert cli("models", "promote", "my-model", "2", *at) == 0
    model = listed(capsys, config)["my-model"]
    assert (model["version"], model.get("traffic")) == (2, None)  # no split: everything to version 2
    assert cli("models", "rollback", "my-model", *at) == 0
    assert listed(capsys, config)["my-model"]["version"] == 1
    capsys.readouterr()
    assert cli("models", "rollback", "my-model", *at) == 1
    assert "no version to roll back to" in capsys.readouterr().err
