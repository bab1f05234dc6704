"""The metering tables as SQLAlchemy models. Alembic migrations (``migrations/versions``) create them; the
models here mirror the head revision (``tests/unit/test_metering_migrations.py`` compares the two).

Money columns are BIGINT nano-dollars. Portable SQL only: SQLite locally, PostgreSQL in production.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

MAX_NAME_LENGTH = 200
MAX_KEY_ID_LENGTH = 32
MAX_TENANT_LENGTH = 64
MAX_REQUEST_ID_LENGTH = 128
MAX_MODEL_LENGTH = 256
MAX_FINISH_REASON_LENGTH = 32
TRACE_ID_LENGTH = 32  # W3C trace id: 16 bytes as lowercase hex
MAX_SERVICE_TIER_LENGTH = 16
DEFAULT_TENANT = "default"
DEFAULT_SCOPES = "inference"


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone, so it stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one (UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Stable constraint names, so Alembic migrations can address them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# BIGINT where a table grows; SQLite only auto-increments an INTEGER PRIMARY KEY (its rowid).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_id", "tenant_id"),)

    key_id: Mapped[str] = mapped_column(String(MAX_KEY_ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    # Hex HMAC-SHA256(server secret, full key): a stolen database alone cannot be replayed as keys.
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    tenant_id: Mapped[str] = mapped_column(String(MAX_TENANT_LENGTH), server_default=DEFAULT_TENANT)
    # JSON array of public model ids; NULL: every model.
    models: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Space-separated scopes ("inference", "admin").
    scopes: Mapped[str] = mapped_column(String(200), server_default=DEFAULT_SCOPES)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class UsageRecord(Base):
    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_key_id_created_at", "key_id", "created_at"),
                      Index("ix_usage_records_tenant_id_created_at", "tenant_id", "created_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Idempotency: the unique constraint, not a read before the write, makes the first record win.
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID_LENGTH), unique=True)
    # No foreign key on purpose: a ledger row is never refused (or lost) because of the key's state.
    key_id: Mapped[str] = mapped_column(String(MAX_KEY_ID_LENGTH))
    model: Mapped[str] = mapped_column(String(MAX_MODEL_LENGTH))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(MAX_FINISH_REASON_LENGTH))
    latency_ms: Mapped[int] = mapped_column(Integer)
    time_to_first_token_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime())
    tenant_id: Mapped[str] = mapped_column(String(MAX_TENANT_LENGTH), server_default=DEFAULT_TENANT)
    # What the request was charged, in nano-dollars, at price ``price_version`` (NULL: an unpriced model, or a
    # record from before prices existed).
    cost_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    price_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, server_default=false())
    cancelled: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The catalog version number of the model that served the request (NULL: from before model versions).
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The request's W3C trace id, 32 hex digits (NULL: not known, or from before trace ids).
    trace_id: Mapped[str | None] = mapped_column(String(TRACE_ID_LENGTH), nullable=True)
    # Of prompt_tokens, those the model reused from its prefix cache (charged at the cached-input price).
    cached_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # The service tier that served it ("default", "flex", "priority"; its cost includes the tier's multiplier).
    # NULL: not known (recorded before migration 0006).
    service_tier: Mapped[str | None] = mapped_column(String(MAX_SERVICE_TIER_LENGTH), nullable=True)


class PriceRow(Base):
    """One version of one model's price. Rows are only ever added: a price change never rewrites history."""

    __tablename__ = "prices"
    __table_args__ = (Index("ix_prices_model_id", "model", "id"),)

    # The price version: increasing across all models.
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(MAX_MODEL_LENGTH))
    input_per_million_nanos: Mapped[int] = mapped_column(BigInteger)
    output_per_million_nanos: Mapped[int] = mapped_column(BigInteger)
    per_request_nanos: Mapped[int] = mapped_column(BigInteger)
    # Per million prompt tokens reused from the model's prefix cache; NULL: the input price.
    cached_input_per_million_nanos: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # "catalog" or "admin".
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class BudgetRow(Base):
    """A spend limit per period for one key or one tenant. ``spent`` + ``reserved`` never exceed ``limit``
    through admission: every reservation is a conditional UPDATE of this row."""

    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope", "subject_id", name="uq_budgets_scope_subject"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # "key" or "tenant".
    scope: Mapped[str] = mapped_column(String(8))
    subject_id: Mapped[str] = mapped_column(String(MAX_TENANT_LENGTH))
    limit_nanos: Mapped[int] = mapped_column(BigInteger)
    # "daily" or "monthly" (UTC boundaries).
    period: Mapped[str] = mapped_column(String(8))
    period_start: Mapped[datetime] = mapped_column(UtcDateTime())
    spent_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    reserved_nanos: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ReservationRow(Base):
    """Worst-case cost held for a request in flight, on at most one key budget and one tenant budget."""

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID_LENGTH), primary_key=True)
    key_budget_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tenant_budget_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # A crashed router's reservations are given back after this time (so budget is not leaked).
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class CatalogModelRow(Base):
    """One model of the catalog (``inferplane.common.catalog``). A deleted model keeps its row (``deleted_at``),
    so the YAML seed does not bring it back at the next start; creating the id again revives it."""

    __tablename__ = "catalog_models"

    model: Mapped[str] = mapped_column(String(MAX_MODEL_LENGTH), primary_key=True)
    # JSON object: the catalog entry's settings (catalog.yaml's keys) but id, triton_model, versions, prices.
    spec: Mapped[str] = mapped_column(Text)
    # JSON object: version number (as text) -> model name in Triton's repository.
    versions: Mapped[str] = mapped_column(Text)
    # The version requests are served by.
    serving_version: Mapped[int] = mapped_column(Integer)
    # "catalog" (seeded from catalog.yaml: a later edit of the file is taken) or "admin" (the file no longer is).
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # The catalog version that added it: models are listed in the order they were added (the file's order first).
    position: Mapped[int] = mapped_column(BigInteger)


class CatalogStateRow(Base):
    """One row (id 1): the catalog's version, raised by one in the transaction of every catalog change, so a
    router that saw version N knows whether anything changed since with one cheap read."""

    __tablename__ = "catalog_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)
