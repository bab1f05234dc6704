"""The metering store: API keys (kept as HMAC digests, never in the clear) and the usage ledger.

Plain Python over SQLAlchemy 2.0; nothing here knows gRPC. Results leave as frozen dataclasses
(``KeyInfo``, ``UsageRow``), never ORM objects. The schema is portable SQL: SQLite is the local
default (WAL and a busy timeout, so the service and the CLI can share one file); PostgreSQL, prices,
budgets and Alembic migrations come later and fit beside these tables.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from services.common.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-ip-"
KEY_ID_LENGTH = 12
# Letters and digits only: a subset of the URL-safe alphabet, so an id never starts with "-" (which a
# command line would take for an option) and the key splits unambiguously at fixed offsets.
_KEY_ID_ALPHABET = string.ascii_letters + string.digits
_KEY_RE = re.compile(rf"^{KEY_PREFIX}(?P<key_id>[A-Za-z0-9]{{{KEY_ID_LENGTH}}})-[A-Za-z0-9_-]{{16,256}}$")
# The one message for every bad key: it must not say which check failed, nor echo the key.
BAD_KEY_MESSAGE = "Incorrect API key provided."

MAX_NAME_LENGTH = 200
MAX_KEY_ID_LENGTH = 32
MAX_REQUEST_ID_LENGTH = 128
MAX_MODEL_LENGTH = 256
MAX_FINISH_REASON_LENGTH = 32
DEFAULT_USAGE_LIMIT = 100
MAX_USAGE_LIMIT = 1000
SQLITE_BUSY_TIMEOUT_S = 30.0


# ---- results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An API key's public facts (never the key, never its digest)."""

    key_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


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

    def __post_init__(self) -> None:
        _require_text("request_id", self.request_id, MAX_REQUEST_ID_LENGTH)
        _require_text("key_id", self.key_id, MAX_KEY_ID_LENGTH)
        _require_text("model", self.model, MAX_MODEL_LENGTH)
        _require_text("finish_reason", self.finish_reason, MAX_FINISH_REASON_LENGTH)
        for name in ("prompt_tokens", "completion_tokens", "latency_ms", "time_to_first_token_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgument(f"{name} must not be negative (got {value})", param=name)
        if self.created_at.tzinfo is None:
            raise InvalidArgument("created_at must carry a time zone", param="created_at")


def _require_text(name: str, value: str, max_length: int) -> None:
    if not value:
        raise InvalidArgument(f"{name} must not be empty", param=name)
    if len(value) > max_length:
        raise InvalidArgument(f"{name} is longer than {max_length} characters", param=name)


# ---- schema --------------------------------------------------------------------------------------


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


# Stable constraint names, so later Alembic migrations can address them on every backend.
_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(MAX_KEY_ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    # Hex HMAC-SHA256(server secret, full key): a stolen database alone cannot be replayed as keys.
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class UsageRecord(Base):
    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_key_id_created_at", "key_id", "created_at"),)

    # BIGINT where the ledger grows; SQLite only auto-increments an INTEGER PRIMARY KEY (its rowid).
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
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


# ---- engine --------------------------------------------------------------------------------------


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``; SQLite gets its parent folder, WAL and a busy timeout."""
    url = make_url(database_url)
    # Bound parameters stay out of error messages (and so out of logs): they may hold key ids.
    kwargs: dict[str, Any] = {"hide_parameters": True, "pool_pre_ping": True}
    if url.get_backend_name() != "sqlite":
        return create_engine(url, **kwargs)
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    if _is_memory_sqlite(url):
        # One shared connection, or every pooled connection (and thread) would see its own empty database.
        kwargs["poolclass"] = StaticPool
    elif url.database and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    memory = _is_memory_sqlite(url)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (service + CLI)
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    return engine


# ---- the store -----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(key_id=row.key_id, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at)


def _usage_row(row: UsageRecord) -> UsageRow:
    return UsageRow(
        request_id=row.request_id, key_id=row.key_id, model=row.model, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, finish_reason=row.finish_reason, latency_ms=row.latency_ms,
        created_at=row.created_at, time_to_first_token_ms=row.time_to_first_token_ms,
        recorded_at=row.recorded_at,
    )


class MeteringStore:
    """API keys and the usage ledger over one SQL database. Blocking: call from a thread in async code."""

    def __init__(self, database_url: str, secret: bytes) -> None:
        assert secret, "the HMAC secret must not be empty"
        self._secret = secret
        self.engine = make_engine(database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def create_tables(self) -> None:
        """Create missing tables (first cut; Alembic migrations replace this later)."""
        with self._translate_errors():
            Base.metadata.create_all(self.engine)

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
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:  # locked, gone, unreachable: worth a retry by the caller
            log.warning("metering database error: %s", type(exc.orig).__name__)
            raise Unavailable("metering database unavailable") from exc

    def _digest(self, plain_key: str) -> str:
        return hmac.new(self._secret, plain_key.encode("utf-8"), hashlib.sha256).hexdigest()

    # -- keys --

    def create_key(self, name: str) -> tuple[KeyInfo, str]:
        """A new key: its public facts and the plain key, which is returned here once and never stored."""
        name = name.strip()
        _require_text("name", name, MAX_NAME_LENGTH)
        for _ in range(3):  # a key id collision (62**12 ids) is all but impossible; retry rather than fail
            key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
            plain = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
            row = ApiKey(key_id=key_id, name=name, key_hash=self._digest(plain), created_at=_now())
            try:
                with self._session() as session, session.begin():
                    session.add(row)
            except IntegrityError:
                continue
            return _key_info(row), plain
        raise Unavailable("could not allocate a key id")

    def verify_key(self, plain_key: str) -> KeyInfo:
        """The key's facts when it is known and not revoked; ``Unauthenticated`` otherwise."""
        match = _KEY_RE.match(plain_key)
        if match is None:
            raise Unauthenticated(BAD_KEY_MESSAGE)
        with self._session() as session:
            row = session.get(ApiKey, match["key_id"])
            if row is None or not hmac.compare_digest(row.key_hash, self._digest(plain_key)):
                raise Unauthenticated(BAD_KEY_MESSAGE)
            if row.revoked_at is not None:
                raise Unauthenticated(BAD_KEY_MESSAGE)
            return _key_info(row)

    def list_keys(self) -> list[KeyInfo]:
        with self._session() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id))
            return [_key_info(r) for r in rows]

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke ``key_id`` (idempotent: revoking again keeps the first revocation time)."""
        with self._session() as session:
            with session.begin():  # the write comes first: no read-then-write lock upgrade on SQLite
                session.execute(
                    update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
                    .values(revoked_at=_now())
                )
            row = session.get(ApiKey, key_id, populate_existing=True)
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}", param="key_id")
            return _key_info(row)

    # -- usage --

    def record_usage(self, rec: UsageRow) -> bool:
        """Store ``rec``; False (and nothing changed) when its request id is already in the ledger."""
        row = UsageRecord(
            request_id=rec.request_id, key_id=rec.key_id, model=rec.model, prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens, finish_reason=rec.finish_reason,
            latency_ms=rec.latency_ms, time_to_first_token_ms=rec.time_to_first_token_ms,
            created_at=rec.created_at, recorded_at=_now(),
        )
        try:
            with self._session() as session, session.begin():
                session.add(row)
            return True
        except IntegrityError:
            # Only a duplicate request id means "already recorded"; any other violation is a real error.
            if self._has_request(rec.request_id):
                return False
            raise

    def _has_request(self, request_id: str) -> bool:
        with self._session() as session:
            found = session.scalar(select(UsageRecord.id).where(UsageRecord.request_id == request_id))
            return found is not None

    def list_usage(self, key_id: str | None = None, limit: int = DEFAULT_USAGE_LIMIT) -> list[UsageRow]:
        """Usage records, newest first (by acceptance time), optionally of one key."""
        if not 1 <= limit <= MAX_USAGE_LIMIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_USAGE_LIMIT} (got {limit})", param="limit")
        query = select(UsageRecord).order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc()).limit(limit)
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        with self._session() as session:
            return [_usage_row(r) for r in session.scalars(query)]

    def count_usage(self, key_id: str | None = None) -> int:
        query = select(func.count()).select_from(UsageRecord)
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        with self._session() as session:
            return session.scalar(query) or 0

    def sqlite_journal_mode(self) -> str | None:
        """The SQLite journal mode (``"wal"``), or None on other backends; for diagnostics and tests."""
        if self.engine.dialect.name != "sqlite":
            return None
        with self.engine.connect() as conn:
            return str(conn.execute(text("PRAGMA journal_mode")).scalar())
