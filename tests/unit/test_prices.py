"""Money is exact: nano-dollar integers, one rounding per request, Decimal only to read and print."""

from __future__ import annotations

import itertools
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from inferplane.assets import CATALOG
from inferplane.common.catalog import CatalogModel, load_catalog
from inferplane.common.money import (
    MAX_PER_REQUEST_NANOS,
    MIN_PER_REQUEST_NANOS,
    MoneyError,
    PriceNanos,
    cost_nanos,
    format_usd,
    usd_to_nanos,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "nanos"), [
    ("0", 0), ("1", 10**9), ("0.15", 150_000_000), ("0.000000001", 1), ("0.000123", 123_000),
    ("12.5", 12_500_000_000), (" 2.50 ", 2_500_000_000), ("1e-6", 1_000), (7, 7 * 10**9),
    (Decimal("0.3"), 300_000_000), (0.1, 100_000_000),  # a float through its shortest repr: "0.1"
])
def test_usd_to_nanos(text: object, nanos: int) -> None:
    assert usd_to_nanos(text) == nanos  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0.0000000001", "0.1234567891", "-1", "abc", "", "NaN", "inf", True, "1/3"])
def test_usd_to_nanos_refuses_inexact_or_negative(bad: object) -> None:
    with pytest.raises(MoneyError):
        usd_to_nanos(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("nanos", "text"), [
    (0, "0"), (1, "0.000000001"), (123_000, "0.000123"), (150_000_000, "0.15"), (10**9, "1"),
    (12_500_000_000, "12.5"), (10**18, "1000000000"),
])
def test_format_usd(nanos: int, text: str) -> None:
    assert format_usd(nanos) == text
    assert usd_to_nanos(text) == nanos  # round trip


def test_cost_is_exact_and_rounded_once_half_to_even() -> None:
    price = PriceNanos(input_per_million=150_000_000, output_per_million=600_000_000)  # $0.15 / $0.60 per M
    assert cost_nanos(price, 1_000_000, 0) == 150_000_000
    assert cost_nanos(price, 7, 5) == 4050  # 7 * 150 + 5 * 600 nano-dollars: exact, no rounding
    # 1 token at $0.0000005/M is 0.0000005 nano: rounds to 0; a sum of 3 such halves is 1.5 -> 2 (even)
    half = PriceNanos(input_per_million=500_000)
    assert cost_nanos(half, 1, 0) == 0 and cost_nanos(half, 3, 0) == 2 and cost_nanos(half, 5, 0) == 2
    # rounding happens once on the sum, not per component: 0.5 + 0.5 = 1, not 0 + 0
    both = PriceNanos(input_per_million=500_000, output_per_million=500_000)
    assert cost_nanos(both, 1, 1) == 1


def test_cost_adds_the_per_request_price() -> None:
    price = PriceNanos(input_per_million=10**9, output_per_million=2 * 10**9, per_request=MIN_PER_REQUEST_NANOS)
    assert price.cost(0, 0) == 1_000  # $1/M in, $2/M out: 1,000 + 500 tokens are $0.001 + $0.001
    assert price.cost(1_000, 500) == 1_000_000 + 1_000_000 + 1_000


def test_cost_is_monotonic_so_a_reservation_always_covers_the_actual_cost() -> None:
    price = PriceNanos(input_per_million=333_333, output_per_million=777_777, per_request=0)
    for prompt, max_tokens in itertools.product(range(0, 40, 7), range(0, 60, 11)):
        worst = price.cost(prompt, max_tokens)
        assert all(price.cost(prompt, n) <= worst for n in range(max_tokens + 1))


def test_large_amounts_stay_exact() -> None:
    price = PriceNanos(input_per_million=9_999_999_999_999, output_per_million=1)
    assert price.cost(10**9, 10**9) == 9_999_999_999_999_000 + 1_000  # beyond float's exact integers


@pytest.mark.parametrize("per_request", [1, 999, MAX_PER_REQUEST_NANOS + 1])
def test_per_request_range(per_request: int) -> None:
    with pytest.raises(MoneyError):
        PriceNanos(per_request=per_request)


def test_per_request_bounds_are_allowed() -> None:
    assert PriceNanos(per_request=MIN_PER_REQUEST_NANOS).per_request == usd_to_nanos("0.000001")
    assert PriceNanos(per_request=MAX_PER_REQUEST_NANOS).per_request == usd_to_nanos("0.50")


def _model(**prices: object) -> dict[str, object]:
    return {"id": "m", "triton_model": "m", "tokenizer": ".", "prices": prices}


def test_catalog_prices_are_read_exactly() -> None:
    m = CatalogModel.model_validate(_model(input_per_million="0.15", output_per_million=0.6, per_request="0.0001"))
    assert m.prices is not None
    assert m.prices.nanos() == PriceNanos(150_000_000, 600_000_000, 100_000)
    assert m.prices.output_per_million == "0.6"


@pytest.mark.parametrize("prices", [
    {"input_per_million": "0.0000000001"},  # sub-nano
    {"output_per_million": "-1"},
    {"per_request": "0.0000001"},  # below $0.000001
    {"per_request": "0.51"},
    {"input_per_million": "cheap"},
])
def test_catalog_refuses_bad_prices(prices: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CatalogModel.model_validate(_model(**prices))


def test_the_shipped_catalog_prices_every_model(tmp_path: Path) -> None:
    catalog = load_catalog(CATALOG)
    assert {m.id for m in catalog.models if m.prices is not None} == {"tiny-llama", "all-minilm-l6-v2", "minilm-raw"}
    raw_model = catalog.get("minilm-raw")
    assert raw_model is not None and raw_model.prices is not None
    assert raw_model.prices.nanos().per_request == 1_000  # $0.000001 a request, nothing per token
    raw = yaml.safe_load((CATALOG).read_text())
    for entry in raw["models"]:
        assert all(isinstance(v, str) for v in entry["prices"].values()), "quote prices: they are decimal strings"


def test_a_model_without_prices_is_unpriced() -> None:
    assert CatalogModel.model_validate({"id": "m", "triton_model": "m", "tokenizer": "."}).prices is None


def test_cached_prompt_tokens_are_charged_at_the_cached_price_exactly() -> None:
    price = PriceNanos(input_per_million=100_000_000, output_per_million=400_000_000,
                       cached_input_per_million=25_000_000)
    # 300 prompt tokens of which 288 cached, 10 completion: (12 * 0.10 + 288 * 0.025 + 10 * 0.40) / 1e6 USD
    assert cost_nanos(price, 300, 10, 288) == (12 * 100_000_000 + 288 * 25_000_000 + 10 * 400_000_000) // 10**6
    assert price.cost(300, 10, 0) == price.cost(300, 10) > price.cost(300, 10, 288)
    # no cached price: the input price, so cached tokens cost what they did before
    plain = PriceNanos(input_per_million=100_000_000, output_per_million=400_000_000)
    assert plain.cached_input == 100_000_000 and plain.cost(300, 10, 288) == plain.cost(300, 10)
    # one rounding of the whole sum, half to even: 2.5 + 0.5 = 3 nano-dollars (rounding each part would give 2 + 0)
    odd = PriceNanos(input_per_million=2_500_000, cached_input_per_million=500_000)
    assert cost_nanos(odd, 2, 0, 1) == 3
    assert cost_nanos(odd, 1, 0, 1) == 0  # 0.5 -> 0 (half to even)
    with pytest.raises(AssertionError, match="some of the prompt"):
        cost_nanos(price, 3, 0, 4)


def test_a_cached_price_above_the_input_price_is_refused() -> None:
    with pytest.raises(MoneyError, match="cached_input_per_million"):
        PriceNanos(input_per_million=100, cached_input_per_million=101)
    with pytest.raises(ValidationError, match="cached_input_per_million"):
        CatalogModel.model_validate(_model(input_per_million="0.10", cached_input_per_million="0.20"))


def test_the_shipped_tiny_llama_has_a_lower_cached_price_and_a_prefix_cache() -> None:
    model = load_catalog(CATALOG).get("tiny-llama")
    assert model is not None and model.prices is not None and model.prefix_cache_blocks > 0
    nanos = model.prices.nanos()
    assert nanos.cached_input_per_million is not None and nanos.cached_input_per_million < nanos.input_per_million
