"""The model catalog in metering's database: models, their versions, and one catalog version counter.

Plain functions over a SQLAlchemy ``Session`` (the store opens the transaction, as ``budgets.py``). Every change
raises the counter by one in its own transaction (``UPDATE catalog_state SET version = version + 1``: a row
lock on PostgreSQL, the one writer on SQLite), so the counter only grows and a router polling it sees every
change. A model's settings are kept as the catalog file writes them (a JSON object of ``CatalogModel``'s keys,
paths relative to the catalog file): each router resolves them against its own copy of the file's folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from inferplane.common.catalog import CatalogModel, traffic_problem
from inferplane.common.errors import FailedPrecondition, InvalidArgument, NotFound
from inferplane.metering.schema import MAX_MODEL_LENGTH, CatalogModelRow, CatalogStateRow

log = logging.getLogger(__name__)

SOURCE_CATALOG = "catalog"
SOURCE_ADMIN = "admin"
# Keys with fields of their own (on the wire and in the row), never inside ``spec``.
OWN_KEYS = frozenset({"id", "triton_model", "versions", "version", "prices"})
SETTINGS = frozenset(CatalogModel.model_fields) - OWN_KEYS


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One catalog model as metering keeps it (the price lives in the price table, by model id)."""

    id: str
    spec: dict[str, Any]
    versions: dict[int, str]
    version: int
    source: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = field(default=None)

    @property
    def triton_model(self) -> str:
        return self.versions[self.version]

    def entry(self) -> dict[str, Any]:
        """The catalog entry as the file would write it (``catalog_from_data`` reads it)."""
        return {**self.spec, "id": self.id, "triton_model": self.triton_model,
                "versions": dict(self.versions), "version": self.version}


def _entry(row: CatalogModelRow) -> ModelEntry:
    return ModelEntry(row.model, json.loads(row.spec), {int(k): v for k, v in json.loads(row.versions).items()},
                      row.serving_version, row.source, row.created_at, row.updated_at, row.deleted_at)


def bump(session: Session) -> int:
    session.execute(update(CatalogStateRow).where(CatalogStateRow.id == 1)
                    .values(version=CatalogStateRow.version + 1))
    return version(session)


def version(session: Session) -> int:
    return session.scalar(select(CatalogStateRow.version).where(CatalogStateRow.id == 1)) or 0


def list_models(session: Session, *, include_deleted: bool = False) -> list[ModelEntry]:
    query = select(CatalogModelRow).order_by(CatalogModelRow.position, CatalogModelRow.model)
    if not include_deleted:
        query = query.where(CatalogModelRow.deleted_at.is_(None))
    return [_entry(r) for r in session.scalars(query)]


def check(model_id: str, spec: Mapping[str, Any], versions: Mapping[int, str], serving: int) -> None:
    """``InvalidArgument`` unless these make a valid catalog entry (the same checks as the file's)."""
    if not model_id or len(model_id) > MAX_MODEL_LENGTH:
        raise InvalidArgument("a model id is required (at most 128 characters)", param="id")
    unknown = sorted(set(spec) - SETTINGS)
    if unknown:
        raise InvalidArgument(f"unknown model settings {unknown}; known: {sorted(SETTINGS)}", param="spec")
    if not versions:
        raise InvalidArgument("a model needs at least one version (version -> triton_model)", param="versions")
    if any(v < 1 or not name for v, name in versions.items()):
        raise InvalidArgument("versions are numbered from 1 and name a Triton model", param="versions")
    if serving not in versions:
        raise InvalidArgument(f"version {serving} is not one of the model's versions {sorted(versions)}",
                              param="version")
    problem = traffic_problem(_traffic(spec.get("traffic")), dict(versions))
    if problem:
        raise InvalidArgument(problem, param="traffic")
    try:
        CatalogModel.model_validate({**spec, "id": model_id, "triton_model": versions[serving],
                                     "versions": dict(versions), "version": serving})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise InvalidArgument(f"invalid model setting {where!r}: {first['msg']}", param=where) from None


def _traffic(raw: Any) -> dict[int, int]:
    """A traffic split as written (JSON's text keys) → version -> weight; ``InvalidArgument`` when not one."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument("traffic is an object: version -> percent, e.g. {\"1\": 90, \"2\": 10}", param="traffic")
    try:
        return {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise InvalidArgument(f"traffic's keys are version numbers, got {sorted(map(str, raw))}",
                              param="traffic") from None


def _normal(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with its traffic split (if any) keyed by version numbers in order, as stored."""
    out = dict(spec)
    if out.get("traffic") is not None:
        out["traffic"] = {str(k): w for k, w in sorted(_traffic(out["traffic"]).items())}
    return out


def create(session: Session, model_id: str, spec: Mapping[str, Any], versions: Mapping[int, str], serving: int,
           *, now: datetime, source: str = SOURCE_ADMIN) -> tuple[ModelEntry, int]:
    """Add a model (or bring back a deleted id); ``FailedPrecondition`` when the id is in use."""
    row = session.get(CatalogModelRow, model_id, with_for_update=True)
    if row is not None and row.deleted_at is None:
        raise FailedPrecondition(f"model {model_id!r} already exists (change it with an update)", param="id")
    check(model_id, spec, versions, serving)
    values = dict(spec=json.dumps(_normal(spec), sort_keys=True),
                  versions=json.dumps({str(k): v for k, v in sorted(versions.items())}), serving_version=serving,
                  source=source, updated_at=now, deleted_at=None, created_at=now)
    new_version = bump(session)
    if row is None:
        row = CatalogModelRow(model=model_id, position=new_version, **values)
        session.add(row)
    else:
        for key, value in values.items():
            setattr(row, key, value)
        row.position = new_version
    session.flush()
    return _entry(row), new_version


def update_model(session: Session, model_id: str, *, spec: Mapping[str, Any] | None = None,
                 versions: Mapping[int, str] | None = None, remove_versions: tuple[int, ...] = (),
                 serving: int | None = None, now: datetime, source: str = SOURCE_ADMIN) -> tuple[ModelEntry, int]:
    """Change a model: ``spec`` keys set (None: back to the default), versions added or removed, the served
    version moved. The catalog version moves only when something changed."""
    row = session.get(CatalogModelRow, model_id, with_for_update=True)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"The model `{model_id}` does not exist.", param="model")
    before = _entry(row)
    new_spec = dict(before.spec)
    for key, value in (spec or {}).items():
        if value is None:
            new_spec.pop(key, None)
        else:
            new_spec[key] = value
    new_versions = {**before.versions, **(versions or {})}
    new_serving = serving if serving is not None else before.version
    for v in remove_versions:
        if v == new_serving:
            raise InvalidArgument(f"version {v} is the one served: serve another before removing it",
                                  param="remove_versions")
        new_versions.pop(v, None)
    check(model_id, new_spec, new_versions, new_serving)
    new_spec = _normal(new_spec)
    if (new_spec, new_versions, new_serving) == (before.spec, before.versions, before.version):
        return before, version(session)
    row.spec = json.dumps(new_spec, sort_keys=True)
    row.versions = json.dumps({str(k): v for k, v in sorted(new_versions.items())})
    row.serving_version, row.source, row.updated_at = new_serving, source, now
    session.flush()
    return _entry(row), bump(session)


def promote(session: Session, model_id: str, version: int | None, *, now: datetime) -> tuple[ModelEntry, int]:
    """Serve ``version`` with all the traffic (a canary split ends); None: roll back, i.e. promote the version
    below the one served (the highest lower number)."""
    row = session.get(CatalogModelRow, model_id, with_for_update=True)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"The model `{model_id}` does not exist.", param="model")
    if version is None:
        current = _entry(row)
        lower = [v for v in current.versions if v < current.version]
        if not lower:
            raise FailedPrecondition(f"model {model_id!r} serves version {current.version}, its lowest: there is "
                                     f"no version to roll back to", param="version")
        version = max(lower)
    return update_model(session, model_id, spec={"traffic": None}, serving=version, now=now)


def delete(session: Session, model_id: str, *, now: datetime) -> tuple[ModelEntry, int]:
    row = session.get(CatalogModelRow, model_id, with_for_update=True)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"The model `{model_id}` does not exist.", param="model")
    row.deleted_at, row.updated_at, row.source = now, now, SOURCE_ADMIN
    session.flush()
    return _entry(row), bump(session)


def seed(session: Session, entries: list[dict[str, Any]], *, now: datetime) -> list[str]:
    """Take the catalog file's entries: a model metering has never had is added; one still as the file made it
    (source "catalog") follows the file's edits; one an admin changed or deleted is left alone. The ids
    added or changed."""
    changed = []
    for raw in entries:
        model_id = str(raw.get("id", ""))
        spec = {k: v for k, v in raw.items() if k not in OWN_KEYS}
        serving = int(raw.get("version") or 1)
        versions = {int(k): str(v) for k, v in (raw.get("versions") or {serving: raw.get("triton_model", "")}).items()}
        row = session.get(CatalogModelRow, model_id, with_for_update=True)
        if row is None:
            create(session, model_id, spec, versions, serving, now=now, source=SOURCE_CATALOG)
        elif row.source == SOURCE_CATALOG and row.deleted_at is None:
            before = _entry(row)
            if (before.spec, before.versions, before.version) == (_normal(spec), versions, serving):
                continue
            update_model(session, model_id, spec={**{k: None for k in before.spec}, **spec}, versions=versions,
                         remove_versions=tuple(v for v in before.versions if v not in versions and v != serving),
                         serving=serving, now=now, source=SOURCE_CATALOG)
        else:
            continue
        changed.append(model_id)
    return changed
