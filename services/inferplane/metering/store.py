"""The metering store: API keys (kept as HMAC digests, never in the clear), prices, budgets and the usage ledger.

Plain Python over SQLAlchemy 2.0; nothing here knows gRPC. Results leave as frozen dataclasses (``KeyInfo``,
``UsageRow``, ``PriceInfo``, ``BudgetInfo``, ``SummaryRow``), never ORM objects. The schema (``schema.py``) is
created and upgraded by Alembic migrations (``migrate``); SQLite is the local default (WAL and a busy timeout, so
the service and the CLI can share one file), PostgreSQL the production one. Money is integer nano-dollars.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import string
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from inferplane.common import wire
from inferplane.common.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from inferplane.common.money import MoneyError, PriceNanos, format_usd
from inferplane.metering import budgets, catalog_db
from inferplane.metering.catalog_db import ModelEntry
from inferplane.metering.db import SQLITE_BUSY_TIMEOUT_S, make_engine, migrate
from inferplane.metering.schema import (
    DEFAULT_TENANT,
    MAX_FINISH_REASON_LENGTH,
    MAX_KEY_ID_LENGTH,
    MAX_MODEL_LENGTH,
    MAX_NAME_LENGTH,
    MAX_REQUEST_ID_LENGTH,
    MAX_TENANT_LENGTH,
    TRACE_ID_LENGTH,
    ApiKey,
    BudgetRow,
    PriceRow,
    UsageRecord,
)

__all__ = ["SQLITE_BUSY_TIMEOUT_S", "BudgetExceeded", "KeyInfo", "MeteringStore", "UsageRow"]

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-ip-"
KEY_ID_LENGTH = 12
# Letters and digits only: a subset of the URL-safe alphabet, so an id never starts with "-" (which a
# command line would take for an option) and the key splits unambiguously at fixed offsets.
_KEY_ID_ALPHABET = string.ascii_letters + string.digits
_KEY_RE = re.compile(rf"^{KEY_PREFIX}(?P<key_id>[A-Za-z0-9]{{{KEY_ID_LENGTH}}})-[A-Za-z0-9_-]{{16,256}}$")
TRACE_ID = re.compile(rf"[0-9a-f]{{{TRACE_ID_LENGTH}}}")
SERVED_TIERS = tuple(wire.TIER_TO_PB)  # the tiers a request is served at ("auto" is served as "default")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The one message for every bad key: it must not say which check failed, nor echo the key.
BAD_KEY_MESSAGE = "Incorrect API key provided."

SCOPES = ("inference", "admin")
DEFAULT_USAGE_LIMIT = 100
MAX_USAGE_LIMIT = 1000
MAX_BATCH = 1000
DEFAULT_RESERVATION_TTL_S = 900.0


# ---- results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An API key's public facts (never the key, never its digest)."""

    key_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    tenant_id: str = DEFAULT_TENANT
    # Public model ids the key may use; empty: every model.
    models: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ("inference",)
    expires_at: datetime | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or _now())


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One request's usage. Built by callers to record; returned by the store with ``recorded_at`` set."""

    request_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: int
    created_at: datetime
    time_to_first_token_ms: int | None = None
    recorded_at: datetime | None = None
    # Empty: the key's tenant as the store knows it.
    tenant_id: str = ""
    # In: what the caller was told (the store recomputes it); out: what the ledger charged.
    cost_nanos: int | None = None
    # The price version charged at; 0: the price in force at ``created_at``.
    price_version: int = 0
    # The reservation this record settles; empty: none.
    reservation_id: str = ""
    cached: bool = False
    # The catalog version number of the model that served it; 0: not known.
    model_version: int = 0
    # The request's W3C trace id (32 lowercase hex digits); empty: not known.
    trace_id: str = ""
    # Of prompt_tokens, those the model reused from its prefix cache.
    cached_tokens: int = 0
    # The service tier it was served at. In: empty means default; out: empty when not known (recorded before the
    # ledger kept tiers).
    service_tier: str = ""
    # In only (no column): that tier's price multiplier (None: 1), which the ledger's cost includes.
    tier_multiplier: Decimal | None = None

    def __post_init__(self) -> None:
        _require_text("request_id", self.request_id, MAX_REQUEST_ID_LENGTH)
        _require_text("key_id", self.key_id, MAX_KEY_ID_LENGTH)
        _require_text("model", self.model, MAX_MODEL_LENGTH)
        _require_text("finish_reason", self.finish_reason, MAX_FINISH_REASON_LENGTH)
        if len(self.tenant_id) > MAX_TENANT_LENGTH:
            raise InvalidArgument(f"tenant_id is longer than {MAX_TENANT_LENGTH} characters", param="tenant_id")
        if len(self.reservation_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument("reservation_id is too long", param="reservation_id")
        for name in ("prompt_tokens", "completion_tokens", "latency_ms", "time_to_first_token_ms", "cost_nanos",
                     "price_version", "model_version", "cached_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgument(f"{name} must not be negative (got {value})", param=name)
        if self.cached_tokens > self.prompt_tokens:
            raise InvalidArgument(f"cached_tokens ({self.cached_tokens}) exceeds prompt_tokens ({self.prompt_tokens})",
                                  param="cached_tokens")
        if self.created_at.tzinfo is None:
            raise InvalidArgument("created_at must carry a time zone", param="created_at")
        if self.trace_id and not TRACE_ID.fullmatch(self.trace_id):
            raise InvalidArgument("trace_id must be 32 lowercase hex digits", param="trace_id")
        if self.service_tier and self.service_tier not in SERVED_TIERS:
            raise InvalidArgument(f"service_tier must be one of {', '.join(SERVED_TIERS)} (got {self.service_tier!r})",
                                  param="service_tier")

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass(frozen=True, slots=True)
class Recorded:
    """How one record was taken: stored now (``created``) or already there; the cost the ledger holds."""

    created: bool
    cost_nanos: int


@dataclass(frozen=True, slots=True)
class PriceInfo:
    model: str
    price: PriceNanos  # price.version is the row id
    source: str
    effective_at: datetime


@dataclass(frozen=True, slots=True)
class BudgetInfo:
    scope: str
    subject_id: str
    limit_nanos: int
    period: str
    period_start: datetime
    spent_nanos: int
    reserved_nanos: int


@dataclass(frozen=True, slots=True)
class Reservation:
    reserved_nanos: int
    price: PriceInfo | None


@dataclass(frozen=True, slots=True)
class SummaryRow:
    day: str
    key_id: str
    tenant_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nanos: int
    cancelled_requests: int
    # Of prompt_tokens, those reused from the model's prefix cache.
    cached_tokens: int = 0
    # The tier that served these requests; empty: not known (recorded before the ledger kept tiers).
    service_tier: str = ""


class BudgetExceeded(ResourceExhausted):
    """A reservation would overspend the key's or the tenant's budget."""

    def __init__(self, refusal: budgets.Refusal) -> None:
        self.refusal = refusal
        who = "this API key" if refusal.scope == "key" else f"tenant {refusal.subject_id!r}"
        super().__init__(f"You exceeded the budget of {who}: ${format_usd(refusal.limit_nanos)} per period, "
                         f"${format_usd(refusal.available_nanos)} left until {refusal.resets_at.isoformat()}.",
                         reason=wire.REASON_INSUFFICIENT_QUOTA)


def _require_text(name: str, value: str, max_length: int) -> None:
    if not value:
        raise InvalidArgument(f"{name} must not be empty", param=name)
    if len(value) > max_length:
        raise InvalidArgument(f"{name} is longer than {max_length} characters", param=name)


def _now() -> datetime:
    return datetime.now(UTC)


def _key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(key_id=row.key_id, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at,
                   tenant_id=row.tenant_id, models=tuple(json.loads(row.models)) if row.models else (),
                   scopes=tuple(row.scopes.split()), expires_at=row.expires_at,
                   requests_per_minute=row.requests_per_minute, tokens_per_minute=row.tokens_per_minute)


def _usage_row(row: UsageRecord) -> UsageRow:
    return UsageRow(
        request_id=row.request_id, key_id=row.key_id, model=row.model, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, finish_reason=row.finish_reason, latency_ms=row.latency_ms,
        created_at=row.created_at, time_to_first_token_ms=row.time_to_first_token_ms,
        recorded_at=row.recorded_at, tenant_id=row.tenant_id, cost_nanos=row.cost_nanos,
        price_version=row.price_version or 0, cached=row.cached, model_version=row.model_version or 0,
        trace_id=row.trace_id or "",
        cached_tokens=row.cached_tokens, service_tier=row.service_tier or "",
    )


def _price_info(row: PriceRow) -> PriceInfo:
    return PriceInfo(row.model, PriceNanos(row.input_per_million_nanos, row.output_per_million_nanos,
                                           row.per_request_nanos, row.id, row.cached_input_per_million_nanos),
                     row.source, row.created_at)


def _price_row(model: str, price: PriceNanos, source: str) -> PriceRow:
    _require_text("model", model, MAX_MODEL_LENGTH)
    try:
        price = PriceNanos(price.input_per_million, price.output_per_million, price.per_request,
                           cached_input_per_million=price.cached_input_per_million)
    except MoneyError as exc:
        raise InvalidArgument(str(exc), param="price") from None
    return PriceRow(model=model, input_per_million_nanos=price.input_per_million,
                    output_per_million_nanos=price.output_per_million, per_request_nanos=price.per_request,
                    cached_input_per_million_nanos=price.cached_input_per_million, source=source, created_at=_now())


def _budget_info(row: BudgetRow) -> BudgetInfo:
    return BudgetInfo(row.scope, row.subject_id, row.limit_nanos, row.period, row.period_start, row.spent_nanos,
                      row.reserved_nanos)


class MeteringStore:
    """Keys, prices, budgets and the usage ledger over one SQL database. Blocking: call from a thread in async
    code. On SQLite, writes of one process are serialised by a lock (SQLite has one writer anyway; the lock
    spares the busy-wait), and the busy timeout covers another process (the CLI)."""

    def __init__(self, database_url: str, secret: bytes, *,
                 reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S) -> None:
        assert secret, "the HMAC secret must not be empty"
        self._secret = secret
        self.engine = make_engine(database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self._sqlite else contextlib.nullcontext())
        self.reservation_ttl = timedelta(seconds=reservation_ttl_s)
        self._tenants: dict[str, str] = {}  # key id -> tenant (a key never changes tenant)
        self._price_rows: dict[int, PriceInfo] = {}  # price versions are immutable: cached forever

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (``alembic upgrade head``)."""
        with self._translate_errors():
            migrate(self.engine)

    def create_tables(self) -> None:
        """Kept for callers of the first cut: the same as ``migrate``."""
        self.migrate()

    def ping(self) -> bool:
        """True when the database answers a query (readiness)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(func.count()).select_from(ApiKey))
            return True
        except SQLAlchemyError as exc:
            log.warning("metering database not ready: %s", type(exc).__name__)
            return False

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._translate_errors(), self._sessions() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction (committed on exit, rolled back on an exception)."""
        with self._write_lock, self._session() as session, session.begin():
            yield session

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:  # locked, gone, unreachable: worth a retry by the caller
            log.warning("metering database error: %s", type(exc.orig).__name__)
            raise Unavailable("metering database unavailable") from exc

    def _digest(self, plain_key: str) -> str:
        return hmac.new(self._secret, plain_key.encode("utf-8"), hashlib.sha256).hexdigest()

    # -- keys --

    def create_key(self, name: str, *, tenant_id: str = DEFAULT_TENANT, models: Sequence[str] | None = None,
                   scopes: Sequence[str] | None = None, expires_at: datetime | None = None,
                   requests_per_minute: int | None = None,
                   tokens_per_minute: int | None = None) -> tuple[KeyInfo, str]:
        """A new key: its public facts and the plain key, which is returned here once and never stored."""
        name = name.strip()
        _require_text("name", name, MAX_NAME_LENGTH)
        tenant_id = (tenant_id or DEFAULT_TENANT).strip()
        if not _TENANT_RE.match(tenant_id):
            raise InvalidArgument("tenant must be 1-64 letters, digits, '.', '_' or '-'", param="tenant_id")
        model_list = sorted({m.strip() for m in models or () if m.strip()})
        for m in model_list:
            _require_text("models", m, MAX_MODEL_LENGTH)
        scope_list = sorted(set(scopes or ("inference",)))
        unknown = set(scope_list) - set(SCOPES)
        if unknown or not scope_list:
            raise InvalidArgument(f"unknown scopes {sorted(unknown)}; known: {list(SCOPES)}", param="scopes")
        if expires_at is not None and expires_at.tzinfo is None:
            raise InvalidArgument("expires_at must carry a time zone", param="expires_at")
        for param, limit in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if limit is not None and limit < 1:
                raise InvalidArgument(f"{param} must be at least 1 (or unset for no limit)", param=param)
        for _ in range(3):  # a key id collision (62**12 ids) is all but impossible; retry rather than fail
            key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
            plain = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
            row = ApiKey(key_id=key_id, name=name, key_hash=self._digest(plain), created_at=_now(),
                         tenant_id=tenant_id, models=json.dumps(model_list) if model_list else None,
                         scopes=" ".join(scope_list), expires_at=expires_at,
                         requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
            try:
                with self._write() as session:
                    session.add(row)
            except IntegrityError:
                continue
            self._tenants[key_id] = tenant_id
            return _key_info(row), plain
        raise Unavailable("could not allocate a key id")

    def verify_key(self, plain_key: str) -> KeyInfo:
        """The key's facts when it is known, not revoked and not expired; ``Unauthenticated`` otherwise."""
        match = _KEY_RE.match(plain_key)
        if match is None:
            raise Unauthenticated(BAD_KEY_MESSAGE)
        with self._session() as session:
            row = session.get(ApiKey, match["key_id"])
            # compare_digest: constant time, so timing does not tell how much of a guess was right.
            if row is None or not hmac.compare_digest(row.key_hash, self._digest(plain_key)):
                raise Unauthenticated(BAD_KEY_MESSAGE)
            info = _key_info(row)
        if info.revoked or info.expired():
            raise Unauthenticated(BAD_KEY_MESSAGE)
        self._tenants[info.key_id] = info.tenant_id
        return info

    def get_key(self, key_id: str) -> KeyInfo:
        with self._session() as session:
            row = session.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}", param="key_id")
            return _key_info(row)

    def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        with self._session() as session:
            return [_key_info(r) for r in session.scalars(query)]

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke ``key_id`` (idempotent: revoking again keeps the first revocation time)."""
        with self._write() as session:  # the write comes first: no read-then-write lock upgrade on SQLite
            session.execute(update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
                            .values(revoked_at=_now()))
        return self.get_key(key_id)

    def tenants_of(self, key_ids: Iterable[str]) -> dict[str, str]:
        """Tenant of each known key (unknown keys are left out)."""
        wanted = set(key_ids)
        missing = wanted - self._tenants.keys()
        if missing:
            with self._session() as session:
                for key_id, tenant in session.execute(select(ApiKey.key_id, ApiKey.tenant_id)
                                                      .where(ApiKey.key_id.in_(sorted(missing)))):
                    self._tenants[key_id] = tenant
        return {k: self._tenants[k] for k in wanted if k in self._tenants}

    def has_budget(self, key_id: str, tenant_id: str) -> bool:
        with self._session() as session:
            key_budget, tenant_budget = budgets.budgets_of(session, key_id, tenant_id)
            return key_budget is not None or tenant_budget is not None

    # -- prices --

    def set_price(self, model: str, price: PriceNanos, *, source: str = "admin") -> PriceInfo:
        """A new price version for ``model`` (history is kept: earlier records keep their version)."""
        row = _price_row(model, price, source)
        with self._write() as session:
            session.add(row)
            session.flush()
        return _price_info(row)

    def price_history(self) -> list[PriceInfo]:
        with self._session() as session:
            infos = [_price_info(r) for r in session.scalars(select(PriceRow).order_by(PriceRow.id))]
        self._price_rows.update((p.price.version, p) for p in infos)
        return infos

    def current_prices(self) -> dict[str, PriceInfo]:
        """The newest price of every priced model."""
        return {p.model: p for p in self.price_history()}  # oldest first: the newest version wins

    def current_price(self, model: str) -> PriceInfo | None:
        with self._session() as session:
            row = session.scalars(select(PriceRow).where(PriceRow.model == model)
                                  .order_by(PriceRow.id.desc()).limit(1)).first()
            return None if row is None else _price_info(row)

    def seed_prices(self, seeds: dict[str, PriceNanos]) -> list[PriceInfo]:
        """Catalog prices: added for a model with no price yet, or whose current price came from the catalog and
        differs (the file was edited). A price an admin set wins over the catalog until it is set again."""
        added = []
        current = self.current_prices()
        for model, seed in sorted(seeds.items()):
            now = current.get(model)
            same = now is not None and (now.price.input_per_million, now.price.output_per_million,
                                        now.price.per_request, now.price.cached_input_per_million) == (
                seed.input_per_million, seed.output_per_million, seed.per_request, seed.cached_input_per_million)
            if now is None or (now.source == "catalog" and not same):
                added.append(self.set_price(model, seed, source="catalog"))
        return added

    def _price_for(self, model: str, version: int, at: datetime, history: list[PriceInfo] | None) -> PriceInfo | None:
        """The price version ``version`` when it is this model's, else the model's price in force at ``at``."""
        if version:
            known = self._price_rows.get(version)
            if known is None:
                history = history if history is not None else self.price_history()
                known = self._price_rows.get(version)
            if known is not None and known.model == model:
                return known
            log.warning("usage record names price version %d, which is not a price of %s", version, model)
        history = history if history is not None else self.price_history()
        in_force = [p for p in history if p.model == model and p.effective_at <= at]
        return in_force[-1] if in_force else None

    # -- the model catalog (catalog_db.py) --

    def catalog(self) -> tuple[int, list[ModelEntry]]:
        """The catalog's version and its models, read together."""
        with self._session() as session, session.begin():
            return catalog_db.version(session), catalog_db.list_models(session)

    def catalog_version(self) -> int:
        with self._session() as session:
            return catalog_db.version(session)

    def seed_catalog(self, entries: list[dict[str, Any]]) -> list[str]:
        """Models from the catalog file (see ``catalog_db.seed``); the ids added or changed."""
        with self._write() as session:
            return catalog_db.seed(session, entries, now=_now())

    def create_model(self, model_id: str, spec: dict[str, Any], versions: dict[int, str], serving: int = 0,
                     price: PriceNanos | None = None) -> tuple[ModelEntry, int]:
        """Add a model (settings left out are copied from the model that serves the same Triton model, if one
        does); with ``price``, its first price version. The entry and the catalog's new version."""
        serving = serving or max(versions, default=1)
        price_row = _price_row(model_id, price, "admin") if price is not None else None
        with self._write() as session:  # the model and its price in one transaction: no router sees one alone
            base = next((m for m in catalog_db.list_models(session)
                         if versions.get(serving) and m.triton_model == versions[serving]), None)
            # its settings, not its canary split (another model's versions)
            inherited = {k: v for k, v in (base.spec if base is not None else {}).items() if k != "traffic"}
            spec = {**inherited, **spec}
            result = catalog_db.create(session, model_id, spec, versions, serving, now=_now())
            if price_row is not None:
                session.add(price_row)
        return result

    def update_model(self, model_id: str, *, spec: dict[str, Any] | None = None,
                     versions: dict[int, str] | None = None, remove_versions: tuple[int, ...] = (),
                     serving: int | None = None, price: PriceNanos | None = None) -> tuple[ModelEntry, int]:
        price_row = _price_row(model_id, price, "admin") if price is not None else None
        with self._write() as session:
            entry, version = catalog_db.update_model(session, model_id, spec=spec, versions=versions,
                                                     remove_versions=remove_versions, serving=serving, now=_now())
            if price_row is not None:
                session.add(price_row)
                version = catalog_db.bump(session)  # a new price is a catalog change: routers look again
        return entry, version

    def promote_model(self, model_id: str, version: int | None) -> tuple[ModelEntry, int]:
        """All traffic to ``version``, served from now on; None: roll back to the version below the served one."""
        with self._write() as session:
            return catalog_db.promote(session, model_id, version, now=_now())

    def delete_model(self, model_id: str) -> tuple[ModelEntry, int]:
        """Take a model out of the catalog; its prices and usage records stay."""
        with self._write() as session:
            return catalog_db.delete(session, model_id, now=_now())

    # -- budgets --

    def set_budget(self, scope: str, subject_id: str, limit_nanos: int, period: str = "monthly") -> BudgetInfo:
        """Create or change a budget (its spend in the current period is kept)."""
        if scope not in budgets.SCOPES:
            raise InvalidArgument(f"scope must be one of {list(budgets.SCOPES)}", param="scope")
        if period not in budgets.PERIODS:
            raise InvalidArgument(f"period must be one of {list(budgets.PERIODS)}", param="period")
        _require_text("subject_id", subject_id, MAX_TENANT_LENGTH)
        if limit_nanos < 1:
            raise InvalidArgument("a budget's limit must be positive", param="limit")
        now = _now()
        with self._write() as session:
            budgets.roll_periods(session, now)
            row = session.scalars(select(BudgetRow).where(BudgetRow.scope == scope,
                                                          BudgetRow.subject_id == subject_id)).first()
            if row is None:
                row = BudgetRow(scope=scope, subject_id=subject_id, limit_nanos=limit_nanos, period=period,
                                period_start=budgets.period_start(period, now), spent_nanos=0, reserved_nanos=0,
                                updated_at=now)
                session.add(row)
            else:
                row.limit_nanos, row.updated_at = limit_nanos, now
                if row.period != period:
                    row.period, row.period_start = period, budgets.period_start(period, now)
            session.flush()
            return _budget_info(row)

    def list_budgets(self, scope: str | None = None) -> list[BudgetInfo]:
        now = _now()
        with self._write() as session:
            budgets.roll_periods(session, now)
            query = select(BudgetRow).order_by(BudgetRow.scope, BudgetRow.subject_id)
            if scope is not None:
                query = query.where(BudgetRow.scope == scope)
            return [_budget_info(r) for r in session.scalars(query)]

    def reserve(self, reservation_id: str, key_id: str, model: str, prompt_tokens: int,
                max_tokens: int, multiplier: Decimal | None = None) -> Reservation:
        """Hold the worst-case cost of (``prompt_tokens``, ``max_tokens``) at the model's current price (times a
        service tier's ``multiplier``) on the key's and tenant's budgets; ``BudgetExceeded`` when either cannot
        take it. Idempotent on the id."""
        _require_text("reservation_id", reservation_id, MAX_REQUEST_ID_LENGTH)
        if prompt_tokens < 0 or max_tokens < 0:
            raise InvalidArgument("token counts must not be negative", param="max_tokens")
        price = self.current_price(model)
        amount = price.price.cost(prompt_tokens, max_tokens, multiplier=multiplier) if price is not None else 0
        tenant = self.tenants_of([key_id]).get(key_id, DEFAULT_TENANT)
        now = _now()
        try:
            with self._write() as session:
                refusal = budgets.reserve(session, reservation_id=reservation_id, key_id=key_id, tenant_id=tenant,
                                          amount=amount, now=now, ttl=self.reservation_ttl)
                if refusal is not None:
                    raise BudgetExceeded(refusal)
        except IntegrityError:
            log.info("reservation %s was already held", reservation_id)  # a retried Reserve: hold it once
        return Reservation(amount, price)

    def release(self, reservation_id: str) -> bool:
        with self._write() as session:
            return bool(budgets.release(session, [reservation_id]))

    def sweep_reservations(self) -> int:
        """Give back expired reservations (a crashed router's); how many."""
        with self._write() as session:
            return budgets.sweep_expired(session, _now())

    # -- usage --

    def record_usage(self, rec: UsageRow) -> bool:
        """Store ``rec``; False (and nothing changed) when its request id is already in the ledger."""
        return self.record_usage_batch([rec])[0].created

    def record_usage_batch(self, recs: Sequence[UsageRow]) -> list[Recorded]:
        """Store many records in one transaction (first record of a request id wins), charge each at its price
        version, settle their reservations and budgets. One ``Recorded`` per input, in order."""
        if len(recs) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} records per batch", param="records")
        if not recs:
            return []
        tenants = self.tenants_of(r.key_id for r in recs)
        history = self.price_history() if any(not r.price_version or r.price_version not in self._price_rows
                                               for r in recs) else None
        now = _now()
        firsts: dict[str, dict[str, Any]] = {}
        for r in recs:
            if r.request_id in firsts:
                continue
            price = self._price_for(r.model, r.price_version, r.created_at, history)
            # a service tier's multiplier (the one it was admitted with) times the price version's cost, rounded once
            cost = price.price.cost(r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                                    multiplier=r.tier_multiplier) if price is not None else 0
            if r.cost_nanos is not None and r.cost_nanos != cost:
                log.warning("request %s: the router said %d nano-dollars, the ledger charges %d", r.request_id,
                            r.cost_nanos, cost)
            firsts[r.request_id] = dict(
                request_id=r.request_id, key_id=r.key_id, model=r.model, prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens, finish_reason=r.finish_reason, latency_ms=r.latency_ms,
                time_to_first_token_ms=r.time_to_first_token_ms, created_at=r.created_at, recorded_at=now,
                # The key's tenant as metering knows it wins over what a record claims.
                tenant_id=tenants.get(r.key_id) or r.tenant_id or DEFAULT_TENANT, cost_nanos=cost,
                price_version=price.price.version if price is not None else None, cached=r.cached,
                cancelled=r.cancelled, model_version=r.model_version or None, trace_id=r.trace_id or None,
                cached_tokens=r.cached_tokens, service_tier=r.service_tier or wire.DEFAULT_TIER)
        reservations = {r.request_id: r.reservation_id for r in recs if r.reservation_id}
        insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(UsageRecord)
        statement = insert.on_conflict_do_nothing(index_elements=["request_id"]).returning(UsageRecord.request_id)
        with self._write() as session:
            created = set(session.execute(statement, list(firsts.values())).scalars())
            budgets.settle(session, [
                budgets.Charge(v["key_id"], v["tenant_id"], v["cost_nanos"], v["created_at"],
                               reservations.get(rid, "")) for rid, v in firsts.items() if rid in created], now)
        existing: dict[str, int] = {}
        duplicates = [rid for rid in firsts if rid not in created]
        if duplicates:
            with self._session() as session:
                existing = {rid: cost for rid, cost in session.execute(
                    select(UsageRecord.request_id, UsageRecord.cost_nanos)
                    .where(UsageRecord.request_id.in_(duplicates)))}
        out: list[Recorded] = []
        seen: set[str] = set()
        for r in recs:
            fresh = r.request_id in created and r.request_id not in seen
            seen.add(r.request_id)
            cost = firsts[r.request_id]["cost_nanos"] if r.request_id in created else existing.get(r.request_id, 0)
            out.append(Recorded(fresh, cost))
        return out

    def _usage_query(self, *, key_id: str | None, tenant_id: str | None, start: datetime | None,
                     end: datetime | None) -> list[Any]:
        where: list[Any] = []
        if key_id is not None:
            where.append(UsageRecord.key_id == key_id)
        if tenant_id is not None:
            where.append(UsageRecord.tenant_id == tenant_id)
        if start is not None:
            where.append(UsageRecord.created_at >= start)
        if end is not None:
            where.append(UsageRecord.created_at < end)
        return where

    def list_usage(self, key_id: str | None = None, limit: int = DEFAULT_USAGE_LIMIT, *, tenant_id: str | None = None,
                   start: datetime | None = None, end: datetime | None = None) -> list[UsageRow]:
        """Usage records, newest first (by acceptance time), optionally of one key or tenant and a time range."""
        if not 1 <= limit <= MAX_USAGE_LIMIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_USAGE_LIMIT} (got {limit})", param="limit")
        query = (select(UsageRecord).where(*self._usage_query(key_id=key_id, tenant_id=tenant_id, start=start,
                                                              end=end))
                 .order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc()).limit(limit))
        with self._session() as session:
            return [_usage_row(r) for r in session.scalars(query)]

    def count_usage(self, key_id: str | None = None) -> int:
        query = select(func.count()).select_from(UsageRecord)
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        with self._session() as session:
            return session.scalar(query) or 0

    def usage_summary(self, *, start: datetime, end: datetime, key_id: str | None = None,
                      tenant_id: str | None = None) -> list[SummaryRow]:
        """Usage summed per UTC day, key, model and service tier in [start, end) (a tier has its own price, as in
        OpenAI's usage API grouped by ``service_tier``); records from before the ledger kept tiers sum under "".
        Sums are the database's, over integers: exact."""
        if start >= end:
            raise InvalidArgument("start must be before end", param="start")
        day = func.date(UsageRecord.created_at)
        tier = func.coalesce(UsageRecord.service_tier, "")
        query = (select(day, UsageRecord.key_id, UsageRecord.tenant_id, UsageRecord.model, tier, func.count(),
                        func.sum(UsageRecord.prompt_tokens), func.sum(UsageRecord.completion_tokens),
                        func.sum(UsageRecord.cost_nanos), func.sum(case((UsageRecord.cancelled, 1), else_=0)),
                        func.sum(UsageRecord.cached_tokens))
                 .where(*self._usage_query(key_id=key_id, tenant_id=tenant_id, start=start, end=end))
                 .group_by(day, UsageRecord.key_id, UsageRecord.tenant_id, UsageRecord.model, tier)
                 .order_by(day, UsageRecord.key_id, UsageRecord.model, tier))
        with self._session() as session:
            return [SummaryRow(str(d), k, t, m, int(n), int(p or 0), int(c or 0), int(cost or 0), int(x or 0),
                               cached_tokens=int(ct or 0), service_tier=str(st))
                    for d, k, t, m, st, n, p, c, cost, x, ct in session.execute(query)]

    def sqlite_journal_mode(self) -> str | None:
        """The SQLite journal mode (``"wal"``), or None on other backends; for diagnostics and tests."""
        if self.engine.dialect.name != "sqlite":
            return None
        with self.engine.connect() as conn:
            return str(conn.execute(text("PRAGMA journal_mode")).scalar())
