"""A request that names no temperature samples at the model's catalog ``default_temperature`` (1.0 unless the
catalog sets it: what the OpenAI and Anthropic APIs promise), which the router always sends the executor explicitly
(an executor given none would decode greedily); a request's own temperature, 0 included, always wins."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from inferplane.assets import CATALOG
from inferplane.common.catalog import CatalogModel, load_catalog
from inferplane.router.engine import GenerationInput, executor_request

CHAT = [{"role": "user", "content": "Hi"}]


def model(**settings: object) -> CatalogModel:
    return CatalogModel(id="m", triton_model="m", tokenizer="/tmp", **settings)  # type: ignore[arg-type]


def sent_temperature(temperature: float | None, catalog_model: CatalogModel) -> float:
    inp = GenerationInput(model="m", prompt="Hi", temperature=temperature)
    req = executor_request(inp, catalog_model, "req-1", [1, 2, 3], [2], max_tokens=4)
    assert req.sampling.HasField("temperature"), "the executor always gets a temperature"
    return req.sampling.temperature


def test_absent_samples_at_one_by_default() -> None:
    assert model().default_temperature == 1.0
    assert sent_temperature(None, model()) == 1.0


def test_absent_takes_the_catalog_default() -> None:
    assert sent_temperature(None, model(default_temperature=0)) == 0.0
    assert sent_temperature(None, model(default_temperature=0.5)) == pytest.approx(0.5)


@pytest.mark.parametrize("asked", [0.0, 0.7, 2.0])
def test_the_request_s_own_temperature_wins(asked: float) -> None:
    assert sent_temperature(asked, model(default_temperature=1.0)) == pytest.approx(asked)
    assert sent_temperature(asked, model(default_temperature=0.0)) == pytest.approx(asked)


@pytest.mark.parametrize("bad", [-0.1, 2.5])
def test_the_catalog_default_is_a_valid_temperature(bad: float) -> None:
    with pytest.raises(ValidationError, match="default_temperature"):
        model(default_temperature=bad)


def test_the_shipped_models_sample_when_asked_for_nothing() -> None:
    for m in load_catalog(CATALOG).models:
        assert m.default_temperature == 1.0, m.id
