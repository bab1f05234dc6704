"""Budgets: reserve a request's worst-case cost at admission, settle it to the actual cost when its usage record
arrives. Functions over an open write transaction (a ``Session`` inside ``begin()``); nothing here commits.

The invariant ``spent + reserved <= limit`` is kept by one conditional UPDATE per budget row
(``... SET reserved = reserved + :a WHERE id = :id AND spent + reserved + :a <= limit``): SQLite runs it under
its database write lock, PostgreSQL re-evaluates the WHERE clause on the locked, latest row version (READ
COMMITTED), so concurrent admissions serialise on the row and can never overshoot together. A request holds
the key's budget and its tenant's budget in the same transaction; every transaction locks budget rows in id
order (no deadlock).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from inferplane.common import wire
from inferplane.metering.schema import BudgetRow, ReservationRow

PERIODS = tuple(wire.BUDGET_PERIODS)  # ("daily", "monthly"): the names are wire contracts
SCOPES = tuple(wire.BUDGET_SCOPES)  # ("key", "tenant")
SWEEP_BATCH = 500


def period_start(period: str, now: datetime) -> datetime:
    """Start (UTC) of the period that contains ``now``."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day
    if period == "monthly":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {period!r}")


def next_period_start(period: str, start: datetime) -> datetime:
    if period == "daily":
        return start + timedelta(days=1)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which budget a reservation would overspend."""

    scope: str
    subject_id: str
    limit_nanos: int
    available_nanos: int
    resets_at: datetime


def roll_periods(session: Session, now: datetime) -> None:
    """Start a new period (spend back to 0) for every budget whose period has ended. Idempotent; on SQLite it is
    also the transaction's first write, so the write lock is taken before anything is read."""
    for period in PERIODS:
        current = period_start(period, now)
        session.execute(update(BudgetRow).where(BudgetRow.period == period, BudgetRow.period_start < current)
                        .values(spent_nanos=0, period_start=current, updated_at=now)
                        .execution_options(synchronize_session=False))


def _give_back(session: Session, released: Iterable[tuple[int | None, int | None, int]]) -> None:
    per_budget: defaultdict[int, int] = defaultdict(int)
    for key_budget, tenant_budget, amount in released:
        for budget_id in (key_budget, tenant_budget):
            if budget_id is not None:
                per_budget[budget_id] += amount
    for budget_id, amount in sorted(per_budget.items()):
        session.execute(update(BudgetRow).where(BudgetRow.id == budget_id)
                        .values(reserved_nanos=BudgetRow.reserved_nanos - amount)
                        .execution_options(synchronize_session=False))


def sweep_expired(session: Session, now: datetime, limit: int = SWEEP_BATCH) -> int:
    """Give back the reservations that outlived their TTL (a crashed router's); returns how many."""
    ids = list(session.scalars(select(ReservationRow.id).where(ReservationRow.expires_at <= now).limit(limit)))
    if not ids:
        return 0
    return len(release(session, ids))


def release(session: Session, reservation_ids: Iterable[str]) -> dict[str, int]:
    """Delete these reservations and give their amounts back; ``{id: amount}`` of those that were held. A
    reservation is released once: DELETE ... RETURNING hands each row to exactly one transaction."""
    ids = sorted(set(reservation_ids))
    if not ids:
        return {}
    rows = session.execute(delete(ReservationRow).where(ReservationRow.id.in_(ids)).returning(
        ReservationRow.id, ReservationRow.key_budget_id, ReservationRow.tenant_budget_id,
        ReservationRow.amount_nanos).execution_options(synchronize_session=False)).all()
    _give_back(session, [(r.key_budget_id, r.tenant_budget_id, r.amount_nanos) for r in rows])
    return {r.id: r.amount_nanos for r in rows}


def budgets_of(session: Session, key_id: str, tenant_id: str) -> tuple[BudgetRow | None, BudgetRow | None]:
    rows = session.scalars(select(BudgetRow).where(or_(
        (BudgetRow.scope == "key") & (BudgetRow.subject_id == key_id),
        (BudgetRow.scope == "tenant") & (BudgetRow.subject_id == tenant_id)))).all()
    by_scope = {r.scope: r for r in rows}
    return by_scope.get("key"), by_scope.get("tenant")


def reserve(session: Session, *, reservation_id: str, key_id: str, tenant_id: str, amount: int, now: datetime,
            ttl: timedelta) -> Refusal | None:
    """Hold ``amount`` on the key's and the tenant's budgets (those that exist); a ``Refusal`` (and nothing held:
    the caller rolls back) when one of them cannot take it. No budget at all: nothing is held."""
    roll_periods(session, now)
    sweep_expired(session, now)
    key_budget, tenant_budget = budgets_of(session, key_id, tenant_id)
    if key_budget is None and tenant_budget is None:
        return None
    # Rows are locked in id order, as ``settle`` and ``release`` lock them: two transactions never wait on each
    # other in a cycle (PostgreSQL would abort one as a deadlock).
    for budget in sorted((b for b in (key_budget, tenant_budget) if b is not None), key=lambda b: b.id):
        result = session.execute(
            update(BudgetRow)
            .where(BudgetRow.id == budget.id,
                   BudgetRow.spent_nanos + BudgetRow.reserved_nanos + amount <= BudgetRow.limit_nanos)
            .values(reserved_nanos=BudgetRow.reserved_nanos + amount, updated_at=now)
            .execution_options(synchronize_session=False))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.refresh(budget)
            return Refusal(budget.scope, budget.subject_id, budget.limit_nanos,
                           max(0, budget.limit_nanos - budget.spent_nanos - budget.reserved_nanos),
                           next_period_start(budget.period, budget.period_start))
    session.add(ReservationRow(id=reservation_id, key_budget_id=key_budget.id if key_budget else None,
                               tenant_budget_id=tenant_budget.id if tenant_budget else None, amount_nanos=amount,
                               created_at=now, expires_at=now + ttl))
    session.flush()
    return None


@dataclass(frozen=True, slots=True)
class Charge:
    """One new ledger row's effect on budgets."""

    key_id: str
    tenant_id: str
    cost_nanos: int
    created_at: datetime
    reservation_id: str


def settle(session: Session, charges: list[Charge], now: datetime) -> None:
    """Release the charges' reservations and add their costs to the budgets of their key and tenant (a cost
    counts in the period its request was accepted in; a request of a period that has ended counts in none)."""
    if not charges:
        return
    release(session, [c.reservation_id for c in charges if c.reservation_id])
    keys = {c.key_id for c in charges}
    tenants = {c.tenant_id for c in charges}
    rows = session.scalars(select(BudgetRow).where(or_(
        (BudgetRow.scope == "key") & BudgetRow.subject_id.in_(keys),
        (BudgetRow.scope == "tenant") & BudgetRow.subject_id.in_(tenants)))).all()
    if not rows:
        return
    stale = [r for r in rows if r.period_start < period_start(r.period, now)]
    if stale:  # a period ended since: start the new one before attributing costs to it
        roll_periods(session, now)
        for row in stale:
            session.refresh(row)
    budgets = {(r.scope, r.subject_id): r for r in rows}
    spend: defaultdict[int, int] = defaultdict(int)
    for c in charges:
        for scope, subject in (("key", c.key_id), ("tenant", c.tenant_id)):
            budget = budgets.get((scope, subject))
            if budget is not None and c.cost_nanos and c.created_at >= budget.period_start:
                spend[budget.id] += c.cost_nanos
    for budget_id, amount in sorted(spend.items()):
        session.execute(update(BudgetRow).where(BudgetRow.id == budget_id)
                        .values(spent_nanos=BudgetRow.spent_nanos + amount, updated_at=now)
                        .execution_options(synchronize_session=False))
