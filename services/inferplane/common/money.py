"""Money as integers: nano-dollars (1 USD = 10**9), and the one rounding rule of a request's cost.

Prices are whole nano-dollars: per million prompt tokens, per million cached prompt tokens (those the model reused
from its prefix cache; the input price when not set), per million completion tokens, per request. A request's exact
cost is the rational number

    ((prompt_tokens - cached_tokens) * input_per_million + cached_tokens * cached_input_per_million
     + completion_tokens * output_per_million) / 10**6 + per_request

and it is rounded once, to a whole nano-dollar, half to even (``cost_nanos``). Nothing is a float;
``Decimal`` appears only at the edges, to read ``"0.15"`` and to print ``"0.000123"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

NANOS_PER_USD = 10**9
TOKENS_PER_PRICE_UNIT = 10**6  # token prices are per million tokens
# The range a per-request price may take, when it is not zero: $0.000001 to $0.50.
MIN_PER_REQUEST_NANOS = 1_000
MAX_PER_REQUEST_NANOS = 500_000_000
# A sanity bound on token prices: $10,000 per million tokens.
MAX_PER_MILLION_NANOS = 10_000 * NANOS_PER_USD


class MoneyError(ValueError):
    """A money amount that cannot be represented exactly (or is out of range)."""


def usd_to_nanos(value: str | int | Decimal | float, *, field: str = "amount") -> int:
    """``"0.15"`` → 150_000_000. Refuses negatives, non-numbers and precision below one nano-dollar.

    A float (an unquoted YAML number) is read through its shortest ``repr``, which is the text that was
    written for any value with at most 15 significant digits.
    """
    if isinstance(value, bool):
        raise MoneyError(f"{field}: expected a decimal string such as \"0.15\", got {value!r}")
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise MoneyError(f"{field}: {value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise MoneyError(f"{field}: {value!r} is not a finite number")
    if amount < 0:
        raise MoneyError(f"{field}: {value!r} is negative")
    nanos = amount * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise MoneyError(f"{field}: {value!r} is more precise than one nano-dollar ($0.000000001)")
    return int(nanos)


def format_usd(nanos: int) -> str:
    """150_000_000 → ``"0.15"``, 123_000 → ``"0.000123"``, 0 → ``"0"``: exact, no exponent, no trailing zeros."""
    text = format(Decimal(nanos).scaleb(-9), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


@dataclass(frozen=True, slots=True)
class PriceNanos:
    """One model's price in nano-dollars; ``version`` 0 is a price metering has not numbered (the catalog's)."""

    input_per_million: int = 0
    output_per_million: int = 0
    per_request: int = 0
    version: int = 0
    # Per million prompt tokens reused from the model's prefix cache; None: the input price. Never above the input
    # price, so a reservation made as if nothing were cached covers every outcome.
    cached_input_per_million: int | None = None

    def __post_init__(self) -> None:
        for name in ("input_per_million", "output_per_million"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_PER_MILLION_NANOS:
                raise MoneyError(f"{name}: {format_usd(value)} USD is outside 0 to "
                                 f"{format_usd(MAX_PER_MILLION_NANOS)} USD per million tokens")
        cached = self.cached_input_per_million
        if cached is not None and not 0 <= cached <= self.input_per_million:
            raise MoneyError(f"cached_input_per_million: {format_usd(cached)} USD must be between 0 and the input "
                             f"price, {format_usd(self.input_per_million)} USD per million tokens")
        if self.per_request != 0 and not MIN_PER_REQUEST_NANOS <= self.per_request <= MAX_PER_REQUEST_NANOS:
            raise MoneyError(f"per_request: {format_usd(self.per_request)} USD is outside "
                             f"{format_usd(MIN_PER_REQUEST_NANOS)} to {format_usd(MAX_PER_REQUEST_NANOS)} USD "
                             "(or 0)")

    @property
    def cached_input(self) -> int:
        """The price per million cached prompt tokens in force (the input price when none is set)."""
        return self.input_per_million if self.cached_input_per_million is None else self.cached_input_per_million

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, *,
             multiplier: Decimal | None = None) -> int:
        return cost_nanos(self, prompt_tokens, completion_tokens, cached_tokens, multiplier=multiplier)


def cost_nanos(price: PriceNanos, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, *,
               multiplier: Decimal | None = None) -> int:
    """A request's cost in nano-dollars: exact, rounded once, half to even. Monotonic in both token counts and
    never more for cached tokens, so a reservation made for (prompt, max_tokens, 0 cached) always covers the cost of
    (prompt, n <= max_tokens, any cached).

    ``multiplier`` (a service tier's, ``Decimal("0.5")``; None or 1: none) multiplies the exact cost before the one
    rounding: ``round_half_even(((prompt - cached) * in + cached * cached_in + completion * out) / 10**6
    + per_request) * multiplier)``."""
    assert prompt_tokens >= 0 and completion_tokens >= 0, "token counts are never negative"
    assert isinstance(cached_tokens, int), "cached_tokens is a count (a tier multiplier goes by keyword)"
    assert 0 <= cached_tokens <= prompt_tokens, f"cached tokens ({cached_tokens}) are some of the prompt's"
    numerator = ((prompt_tokens - cached_tokens) * price.input_per_million + cached_tokens * price.cached_input
                 + completion_tokens * price.output_per_million)
    if multiplier is not None and multiplier != 1:
        assert multiplier > 0, "a tier multiplier is positive"
        exact = (Fraction(numerator, TOKENS_PER_PRICE_UNIT) + price.per_request) * Fraction(multiplier)
        return round(exact)  # Fraction rounds half to even
    whole, rest = divmod(numerator, TOKENS_PER_PRICE_UNIT)
    half = TOKENS_PER_PRICE_UNIT // 2
    if rest > half or (rest == half and whole % 2 == 1):
        whole += 1
    return whole + price.per_request
