"""Operator commands for API keys and usage, working directly on the metering store.

``register(subparsers)`` adds ``keys create|list|revoke`` and ``usage`` to a parent command (the
``inferplane`` console script); each parsed command carries ``func(args) -> int`` (the exit status).
The stack need not run: the CLI opens the same database and secret as the service.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from services.common.errors import InferplaneError, InvalidArgument
from services.common.settings import load_settings
from services.metering.main import MeteringSettings, open_store
from services.metering.store import DEFAULT_USAGE_LIMIT, MeteringStore

Handler = Callable[[MeteringStore, argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys`` and ``usage`` commands to ``subparsers``."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an absent option leaves alone a --config the parent command may have parsed already.
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="YAML file; its 'metering' section is read (environment overrides it)")

    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="{create,list,revoke}", required=True)

    create = keys_sub.add_parser("create", parents=[common], help="create a key (shown once, on stdout)")
    create.add_argument("--name", required=True, help="a name for the key (who or what uses it)")
    create.set_defaults(func=_command(_keys_create))

    lst = keys_sub.add_parser("list", parents=[common], help="list keys (ids and names, never the keys)")
    lst.set_defaults(func=_command(_keys_list))

    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=_command(_keys_revoke))

    usage = subparsers.add_parser("usage", parents=[common], help="show usage records, newest first")
    usage.add_argument("--key-id", default=None, help="only this key's records")
    usage.add_argument("--limit", type=int, default=DEFAULT_USAGE_LIMIT, help="at most this many records")
    usage.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    usage.set_defaults(func=_command(_usage))


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
        except InferplaneError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2 if isinstance(exc, InvalidArgument) else 1

    return run


def _keys_create(store: MeteringStore, args: argparse.Namespace) -> int:
    info, plain = store.create_key(args.name)
    print(plain)  # the only time the key exists outside its holder
    print(f"created key {info.key_id} ({info.name}); it is shown only once, store it now", file=sys.stderr)
    return 0


def _keys_list(store: MeteringStore, args: argparse.Namespace) -> int:
    rows = [[k.key_id, k.name, _when(k.created_at), _when(k.revoked_at) or "-"] for k in store.list_keys()]
    _table(["KEY_ID", "NAME", "CREATED", "REVOKED"], rows)
    return 0


def _keys_revoke(store: MeteringStore, args: argparse.Namespace) -> int:
    info = store.revoke_key(args.key_id)
    print(f"revoked key {info.key_id} ({info.name}) at {_when(info.revoked_at)}")
    return 0


def _usage(store: MeteringStore, args: argparse.Namespace) -> int:
    rows = store.list_usage(key_id=args.key_id, limit=args.limit)
    if args.json:
        print(json.dumps([_jsonable(dataclasses.asdict(r)) for r in rows], indent=2))
        return 0
    _table(
        ["CREATED", "REQUEST_ID", "KEY_ID", "MODEL", "PROMPT", "COMPLETION", "FINISH", "LATENCY_MS", "TTFT_MS"],
        [[_when(r.created_at), r.request_id, r.key_id, r.model, str(r.prompt_tokens), str(r.completion_tokens),
          r.finish_reason, str(r.latency_ms),
          "-" if r.time_to_first_token_ms is None else str(r.time_to_first_token_ms)] for r in rows],
    )
    return 0


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
