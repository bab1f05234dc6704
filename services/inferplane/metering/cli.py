"""Operator commands for API keys, prices, budgets and usage, working directly on the metering store.

``register(subparsers)`` adds ``keys create|list|revoke``, ``prices set|list``, ``budgets set|list`` and ``usage``
to a parent command (the ``inferplane`` console script); each parsed command carries ``func(args) -> int`` (the
exit status). The stack need not run: the CLI opens the same database and secret as the service. Money is typed
and shown in USD as exact decimals ("0.15"); it is kept in nano-dollars.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from inferplane.common import wire
from inferplane.common.errors import InferplaneError, InvalidArgument
from inferplane.common.money import MoneyError, PriceNanos, format_usd, usd_to_nanos
from inferplane.common.settings import load_settings
from inferplane.metering.main import open_store
from inferplane.metering.models_cli import register as register_models
from inferplane.metering.settings import MeteringSettings
from inferplane.metering.store import DEFAULT_USAGE_LIMIT, MeteringStore

Handler = Callable[[MeteringStore, argparse.Namespace], int]
_RELATIVE = re.compile(r"^(?P<n>\d+)(?P<unit>[mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys``, ``prices``, ``budgets`` and ``usage`` commands to ``subparsers``."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an absent option leaves alone a --config the parent command may have parsed already.
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="YAML file; its 'metering' section is read (environment overrides it)")

    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="{create,list,revoke}", required=True)

    create = keys_sub.add_parser("create", parents=[common], help="create a key (shown once, on stdout)")
    create.add_argument("--name", required=True, help="a name for the key (who or what uses it)")
    create.add_argument("--tenant", default="default", help="the tenant (project) the key belongs to")
    create.add_argument("--models", default=None, help="comma-separated model ids the key may use (default: all)")
    create.add_argument("--expires", default=None, help="expiry: 30d, 12h, 2w, or an ISO date/time (UTC)")
    create.add_argument("--admin", action="store_true", help="an admin key (the admin API), not an inference key")
    create.add_argument("--budget", default=None, help="spend limit in USD per period, e.g. 10.00")
    create.add_argument("--budget-period", choices=list(wire.BUDGET_PERIODS), default=wire.DEFAULT_BUDGET_PERIOD)
    create.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute (default: unlimited)")
    create.set_defaults(func=_command(_keys_create))

    lst = keys_sub.add_parser("list", parents=[common], help="list keys (ids and names, never the keys)")
    lst.add_argument("--tenant", default=None, help="only this tenant's keys")
    lst.set_defaults(func=_command(_keys_list))

    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=_command(_keys_revoke))

    prices = subparsers.add_parser("prices", help="set and list model prices (USD)")
    prices_sub = prices.add_subparsers(dest="prices_command", metavar="{set,list}", required=True)
    pset = prices_sub.add_parser("set", parents=[common], help="set a model's price (a new price version)")
    pset.add_argument("model")
    pset.add_argument("--input", required=True, help="USD per million prompt tokens, e.g. 0.15")
    pset.add_argument("--output", required=True, help="USD per million completion tokens, e.g. 0.60")
    pset.add_argument("--per-request", default="0", help="USD per request (0, or 0.000001 to 0.50)")
    pset.add_argument("--cached-input", default=None,
                      help="USD per million prompt tokens reused from the prefix cache (default: the input price)")
    pset.set_defaults(func=_command(_prices_set))
    plist = prices_sub.add_parser("list", parents=[common], help="current prices (or --history)")
    plist.add_argument("--history", action="store_true", help="every price version, oldest first")
    plist.set_defaults(func=_command(_prices_list))

    budgets = subparsers.add_parser("budgets", help="set and list spend limits of keys and tenants")
    budgets_sub = budgets.add_subparsers(dest="budgets_command", metavar="{set,list}", required=True)
    bset = budgets_sub.add_parser("set", parents=[common], help="set a key's or a tenant's budget")
    who = bset.add_mutually_exclusive_group(required=True)
    who.add_argument("--key-id", default=None)
    who.add_argument("--tenant", default=None)
    bset.add_argument("--limit", required=True, help="USD per period, e.g. 25.00")
    bset.add_argument("--period", choices=list(wire.BUDGET_PERIODS), default=wire.DEFAULT_BUDGET_PERIOD)
    bset.set_defaults(func=_command(_budgets_set))
    blist = budgets_sub.add_parser("list", parents=[common], help="budgets with their spend this period")
    blist.set_defaults(func=_command(_budgets_list))

    usage = subparsers.add_parser("usage", parents=[common], help="show usage records (newest first) or a summary")
    usage.add_argument("--key-id", default=None, help="only this key's records")
    usage.add_argument("--tenant", default=None, help="only this tenant's records")
    usage.add_argument("--since", default=None, help="from: 7d, 24h, or an ISO date/time (UTC)")
    usage.add_argument("--until", default=None, help="until (exclusive): an ISO date/time (UTC); default now")
    usage.add_argument("--summary", action="store_true", help="sum by day, key, model and service tier")
    usage.add_argument("--limit", type=int, default=DEFAULT_USAGE_LIMIT, help="at most this many records")
    fmt = usage.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    usage.set_defaults(func=_command(_usage))
    register_models(subparsers)  # the model catalog's commands: models_cli.py


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Open the store from the settings, run ``handler``, report domain errors on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            settings = load_settings(MeteringSettings, config_file=getattr(args, "config", None),
                                     section="metering")
            store = open_store(settings)
            try:
                return handler(store, args)
            finally:
                store.close()
        except MoneyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except InferplaneError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2 if isinstance(exc, InvalidArgument) else 1

    return run


def parse_when(text: str, *, now: datetime | None = None, future: bool = False) -> datetime:
    """``30d``/``12h``/``2w``/``15m`` (before now, or after it when ``future``) or an ISO date/time (UTC if naive)."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        delta = timedelta(**{_UNITS[match["unit"]]: int(match["n"])})
        return now + delta if future else now - delta
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgument(f"not a time: {text!r} (use 30d, 12h or an ISO date/time)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _keys_create(store: MeteringStore, args: argparse.Namespace) -> int:
    models = [m for m in (args.models or "").split(",") if m.strip()]
    info, plain = store.create_key(
        args.name, tenant_id=args.tenant, models=models, scopes=["admin"] if args.admin else None,
        expires_at=parse_when(args.expires, future=True) if args.expires else None,
        requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    if args.budget is not None:
        store.set_budget("key", info.key_id, usd_to_nanos(args.budget, field="--budget"), args.budget_period)
    print(plain)  # the only time the key exists outside its holder
    print(f"created {'admin ' if args.admin else ''}key {info.key_id} ({info.name}, tenant {info.tenant_id}); "
          "it is shown only once, store it now", file=sys.stderr)
    return 0


def _keys_list(store: MeteringStore, args: argparse.Namespace) -> int:
    rows = [[k.key_id, k.name, k.tenant_id, ",".join(k.scopes), ",".join(k.models) or "*",
             _limit(k.requests_per_minute), _limit(k.tokens_per_minute), _when(k.created_at),
             _when(k.expires_at) or "-", _when(k.revoked_at) or "-"] for k in store.list_keys(args.tenant)]
    _table(["KEY_ID", "NAME", "TENANT", "SCOPES", "MODELS", "RPM", "TPM", "CREATED", "EXPIRES", "REVOKED"], rows)
    return 0


def _keys_revoke(store: MeteringStore, args: argparse.Namespace) -> int:
    info = store.revoke_key(args.key_id)
    print(f"revoked key {info.key_id} ({info.name}) at {_when(info.revoked_at)}")
    return 0


def _prices_set(store: MeteringStore, args: argparse.Namespace) -> int:
    cached = None if args.cached_input is None else usd_to_nanos(args.cached_input, field="--cached-input")
    price = PriceNanos(usd_to_nanos(args.input, field="--input"), usd_to_nanos(args.output, field="--output"),
                       usd_to_nanos(args.per_request, field="--per-request"), cached_input_per_million=cached)
    info = store.set_price(args.model, price)
    print(f"price of {info.model} is now version {info.price.version}: ${format_usd(price.input_per_million)} "
          f"/ ${format_usd(price.output_per_million)} per million tokens in / out "
          f"(${format_usd(price.cached_input)} cached in), ${format_usd(price.per_request)} per request")
    return 0


def _prices_list(store: MeteringStore, args: argparse.Namespace) -> int:
    prices = store.price_history() if args.history else sorted(store.current_prices().values(),
                                                               key=lambda p: p.model)
    _table(["MODEL", "VERSION", "INPUT_PER_M", "CACHED_INPUT_PER_M", "OUTPUT_PER_M", "PER_REQUEST", "SOURCE", "SINCE"],
           [[p.model, str(p.price.version), format_usd(p.price.input_per_million), format_usd(p.price.cached_input),
             format_usd(p.price.output_per_million), format_usd(p.price.per_request), p.source,
             _when(p.effective_at)] for p in prices])
    return 0


def _budgets_set(store: MeteringStore, args: argparse.Namespace) -> int:
    scope, subject = ("key", args.key_id) if args.key_id else ("tenant", args.tenant)
    info = store.set_budget(scope, subject, usd_to_nanos(args.limit, field="--limit"), args.period)
    print(f"budget of {info.scope} {info.subject_id}: ${format_usd(info.limit_nanos)} {info.period}, "
          f"${format_usd(info.spent_nanos)} spent since {_when(info.period_start)}")
    return 0


def _budgets_list(store: MeteringStore, args: argparse.Namespace) -> int:
    _table(["SCOPE", "SUBJECT", "LIMIT", "PERIOD", "SPENT", "RESERVED", "PERIOD_START"],
           [[b.scope, b.subject_id, format_usd(b.limit_nanos), b.period, format_usd(b.spent_nanos),
             format_usd(b.reserved_nanos), _when(b.period_start)] for b in store.list_budgets()])
    return 0


def _usage(store: MeteringStore, args: argparse.Namespace) -> int:
    until = parse_when(args.until) if args.until else None
    start = parse_when(args.since, now=until) if args.since else None
    if args.summary:
        end = until or datetime.now(UTC)
        summary = store.usage_summary(start=start or end - timedelta(days=30), end=end, key_id=args.key_id,
                                      tenant_id=args.tenant)
        header = ["DAY", "KEY_ID", "TENANT", "MODEL", "TIER", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "CANCELLED",
                  "COST_USD"]
        table = [[r.day, r.key_id, r.tenant_id, r.model, r.service_tier or "-", str(r.requests), str(r.prompt_tokens),
                  str(r.cached_tokens), str(r.completion_tokens), str(r.cancelled_requests), format_usd(r.cost_nanos)]
                 for r in summary]
        dicts: list[dict[str, Any]] = [{**dataclasses.asdict(r), "cost": format_usd(r.cost_nanos)} for r in summary]
    else:
        rows = store.list_usage(key_id=args.key_id, limit=args.limit, tenant_id=args.tenant, start=start, end=until)
        header = ["CREATED", "REQUEST_ID", "KEY_ID", "TENANT", "MODEL", "TIER", "PROMPT", "CACHED", "COMPLETION",
                  "FINISH", "LATENCY_MS", "TTFT_MS", "COST_USD", "PRICE_V"]
        table = [[_when(r.created_at), r.request_id, r.key_id, r.tenant_id, r.model, r.service_tier or "-",
                  str(r.prompt_tokens),
                  str(r.cached_tokens), str(r.completion_tokens), r.finish_reason, str(r.latency_ms),
                  "-" if r.time_to_first_token_ms is None else str(r.time_to_first_token_ms),
                  format_usd(r.cost_nanos or 0), str(r.price_version or "-")] for r in rows]
        dicts = [_jsonable({**dataclasses.asdict(r), "cancelled": r.cancelled, "cost": format_usd(r.cost_nanos or 0)})
                 for r in rows]
    if args.json:
        print(json.dumps(dicts, indent=2))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow([h.lower() for h in header])
        writer.writerows(table)
    else:
        _table(header, table)
    return 0


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
