"""``inferplane models list|register|set|set-price|traffic|promote|rollback|delete|upload``: the model catalog
in metering's database.

As the other operator commands (``cli.py``), these open the store directly; the stack need not run. ``upload`` is
the exception: it sends a folder to the running stack's ``/admin/models/upload``, whose checks it must pass. A running
router picks each change up within its ``catalog_poll_s`` (docs/catalog.md). The catalog file seeds the store first,
as metering does at its start, so a fresh database lists the shipped models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from inferplane.common.errors import InferplaneError, InvalidArgument
from inferplane.common.money import MoneyError, PriceNanos, format_usd, usd_to_nanos
from inferplane.common.settings import load_settings
from inferplane.metering.catalog_db import ModelEntry
from inferplane.metering.main import open_store, seed_catalog, seed_prices
from inferplane.metering.settings import MeteringSettings
from inferplane.metering.store import MeteringStore

Handler = Callable[[MeteringStore, argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="YAML file; its 'metering' section is read (environment overrides it)")
    models = subparsers.add_parser("models", help="list, register, change and delete catalog models")
    sub = models.add_subparsers(dest="models_command", required=True,
                                metavar="{list,register,set,set-price,traffic,promote,rollback,delete,upload}")

    lst = sub.add_parser("list", parents=[common], help="the catalog: models, versions, prices")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=_command(_list))

    price = argparse.ArgumentParser(add_help=False)
    price.add_argument("--input", default=None, help="USD per million prompt tokens, e.g. 0.15")
    price.add_argument("--output", default=None, help="USD per million completion tokens, e.g. 0.60")
    price.add_argument("--per-request", default=None, help="USD per request (0, or 0.000001 to 0.50)")
    price.add_argument("--cached-input", default=None,
                       help="USD per million prompt tokens reused from the prefix cache (default: the input price)")

    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                          help="a catalog setting (tokenizer, context_length, tasks, owned_by, ...); the value is "
                               "read as YAML ('[chat]', '512'); repeatable")

    reg = sub.add_parser("register", parents=[common, price, settings],
                         help="add a model already in the executors' Triton repository under a public id")
    reg.add_argument("model", help="the public model id, e.g. my-finetune")
    reg.add_argument("--triton-model", required=True, help="the Triton model that serves it, e.g. tiny-llama")
    reg.set_defaults(func=_command(_register))

    chg = sub.add_parser("set", parents=[common, settings], help="change a model's settings or versions")
    chg.add_argument("model")
    chg.add_argument("--version", dest="versions", action="append", default=[], metavar="N=TRITON_MODEL",
                     help="add (or repoint) version N; repeatable")
    chg.add_argument("--serve", type=int, default=None, metavar="N", help="serve version N from now on")
    chg.set_defaults(func=_command(_set))

    sp = sub.add_parser("set-price", parents=[common, price], help="a new price version for a model")
    sp.add_argument("model")
    sp.set_defaults(func=_command(_set_price))

    tr = sub.add_parser("traffic", parents=[common],
                        help="split a model's requests over its versions (a canary), sticky per user")
    tr.add_argument("model")
    tr.add_argument("weights", nargs="+", metavar="N=PERCENT",
                    help="version N's share in percent, e.g. 1=90 2=10 (non-negative integers summing to 100)")
    tr.set_defaults(func=_command(_traffic))

    pr = sub.add_parser("promote", parents=[common], help="serve version N with all the traffic")
    pr.add_argument("model")
    pr.add_argument("version", type=int)
    pr.set_defaults(func=_command(_promote))

    rb = sub.add_parser("rollback", parents=[common],
                        help="promote the version before the one served (the highest lower number)")
    rb.add_argument("model")
    rb.set_defaults(func=_command(_rollback))

    rm = sub.add_parser("delete", parents=[common], help="take a model out of the catalog (usage and prices stay)")
    rm.add_argument("model")
    rm.set_defaults(func=_command(_delete))

    up = sub.add_parser("upload", parents=[price],
                        help="upload a model folder to the running stack (POST /admin/models/upload): checked, "
                             "added to the catalog, loaded by the executors")
    up.add_argument("model", help="the public model id (also its Triton model's name)")
    source = up.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="DIR",
                        help="a Hugging Face Llama checkpoint folder (config.json, *.safetensors, tokenizer.json, "
                             "tokenizer_config.json); priced with --input/--output (and --per-request)")
    source.add_argument("--triton-dir", type=Path, metavar="DIR",
                        help="a Triton model directory (config.pbtxt, 1/model.py; Python backend), reached through "
                             "the KServe v2 protocol; priced with --per-request only")
    up.add_argument("--edge", default="http://127.0.0.1:8080", help="the stack's edge (default: %(default)s)")
    up.add_argument("--admin-key", default=None, help="an admin key (default: $INFERPLANE_ADMIN_KEY)")
    up.add_argument("--owned-by", default="", help="shown as owned_by in /v1/models (default: uploaded)")
    up.set_defaults(func=_upload)


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            settings = load_settings(MeteringSettings, config_file=getattr(args, "config", None),
                                     section="metering")
            store = open_store(settings)
            try:
                seed_prices(store, settings.catalog)
                seed_catalog(store, settings.catalog)
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


def _settings(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"--set {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value else None
    return out


def _price(args: argparse.Namespace, current: PriceNanos | None = None) -> PriceNanos | None:
    given = (args.input, args.output, args.per_request, args.cached_input)
    if all(v is None for v in given):
        return None
    base = current or PriceNanos()
    # a cached-input price not given is kept, unless a new input price falls below it (then: the input price)
    input_price = usd_to_nanos(args.input, field="--input") if args.input is not None else base.input_per_million
    cached = (usd_to_nanos(args.cached_input, field="--cached-input") if args.cached_input is not None
              else base.cached_input_per_million)
    if args.cached_input is None and cached is not None and cached > input_price:
        cached = None
    return PriceNanos(
        input_price,
        usd_to_nanos(args.output, field="--output") if args.output is not None else base.output_per_million,
        usd_to_nanos(args.per_request, field="--per-request") if args.per_request is not None else base.per_request,
        cached_input_per_million=cached)


def _show(store: MeteringStore, entry: ModelEntry, version: int, verb: str) -> None:
    price = store.current_price(entry.id)
    priced = "unpriced" if price is None else (
        f"${format_usd(price.price.input_per_million)} / ${format_usd(price.price.output_per_million)} per million "
        f"tokens in / out, ${format_usd(price.price.per_request)} per request")
    split = entry.spec.get("traffic")
    shown = f"traffic {_split(split)}, " if split else ""
    print(f"{verb} {entry.id}: version {entry.version} on Triton model {entry.triton_model}, {shown}{priced} "
          f"(catalog version {version})")


def _split(traffic: dict[str, int]) -> str:
    return " ".join(f"{k}={w}" for k, w in traffic.items())


def _list(store: MeteringStore, args: argparse.Namespace) -> int:
    version, models = store.catalog()
    prices = store.current_prices()
    if args.json:
        print(json.dumps({"catalog_version": version, "models": [
            {**m.entry(), "source": m.source, "price": None if m.id not in prices else {
                "input_per_million": format_usd(prices[m.id].price.input_per_million),
                "cached_input_per_million": format_usd(prices[m.id].price.cached_input),
                "output_per_million": format_usd(prices[m.id].price.output_per_million),
                "per_request": format_usd(prices[m.id].price.per_request),
                "version": prices[m.id].price.version}} for m in models]}, indent=2))
        return 0
    rows = [[m.id, str(m.version), m.triton_model, ",".join(f"{k}={v}" for k, v in sorted(m.versions.items())),
             _split(m.spec["traffic"]) if m.spec.get("traffic") else f"{m.version}=100",
             ",".join(m.spec.get("tasks", ["chat", "completion"])),
             *([format_usd(prices[m.id].price.input_per_million), format_usd(prices[m.id].price.output_per_million),
                format_usd(prices[m.id].price.per_request)] if m.id in prices else ["-", "-", "-"]), m.source]
            for m in models]
    header = ["MODEL", "SERVING", "TRITON_MODEL", "VERSIONS", "TRAFFIC", "TASKS", "INPUT_PER_M", "OUTPUT_PER_M",
              "PER_REQUEST", "SOURCE"]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print(f"catalog version {version}", file=sys.stderr)
    return 0


def _register(store: MeteringStore, args: argparse.Namespace) -> int:
    entry, version = store.create_model(args.model, _settings(args.settings), {1: args.triton_model},
                                        price=_price(args))
    _show(store, entry, version, "registered")
    return 0


def _set(store: MeteringStore, args: argparse.Namespace) -> int:
    versions: dict[int, str] = {}
    for pair in args.versions:
        number, sep, triton = pair.partition("=")
        if not sep or not number.strip().isdigit() or not triton.strip():
            raise InvalidArgument(f"--version {pair!r}: expected N=TRITON_MODEL")
        versions[int(number)] = triton.strip()
    entry, version = store.update_model(args.model, spec=_settings(args.settings), versions=versions,
                                        serving=args.serve)
    _show(store, entry, version, "changed")
    return 0


def _set_price(store: MeteringStore, args: argparse.Namespace) -> int:
    current = store.current_price(args.model)
    price = _price(args, current.price if current is not None else None)
    if price is None:
        raise InvalidArgument("give at least one of --input, --output, --per-request, --cached-input")
    entry, version = store.update_model(args.model, price=price)
    _show(store, entry, version, "repriced")
    return 0


def _traffic(store: MeteringStore, args: argparse.Namespace) -> int:
    weights: dict[str, Any] = {}
    for pair in args.weights:
        number, sep, weight = pair.partition("=")
        if not sep or not number.strip().isdigit() or not weight.strip().lstrip("-").isdigit():
            raise InvalidArgument(f"{pair!r}: expected N=PERCENT (integers), e.g. 1=90")
        weights[number.strip()] = int(weight)
    entry, version = store.update_model(args.model, spec={"traffic": weights})
    _show(store, entry, version, "split")
    return 0


def _promote(store: MeteringStore, args: argparse.Namespace) -> int:
    entry, version = store.promote_model(args.model, args.version)
    _show(store, entry, version, "promoted")
    return 0


def _rollback(store: MeteringStore, args: argparse.Namespace) -> int:
    entry, version = store.promote_model(args.model, None)
    _show(store, entry, version, "rolled back")
    return 0


def _delete(store: MeteringStore, args: argparse.Namespace) -> int:
    entry, version = store.delete_model(args.model)
    print(f"deleted {entry.id} (catalog version {version}); its prices and usage records are kept")
    return 0


def _upload(args: argparse.Namespace) -> int:
    """Tar (gzip) the folder into a temporary file and stream it to ``/admin/models/upload``."""
    folder: Path = args.checkpoint or args.triton_dir
    key = args.admin_key or os.environ.get("INFERPLANE_ADMIN_KEY", "")
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    if not key:
        print("error: give --admin-key or set INFERPLANE_ADMIN_KEY", file=sys.stderr)
        return 2
    params = {"id": args.model, "kind": "triton" if args.triton_dir else "checkpoint",
              **{name: value for name, value in (("input_per_million", args.input),
                                                  ("output_per_million", args.output),
                                                  ("per_request", args.per_request), ("owned_by", args.owned_by))
                 if value}}
    with tempfile.TemporaryFile() as body:
        with tarfile.open(fileobj=body, mode="w:gz") as tar:
            tar.add(folder, arcname=args.model, filter=lambda info: None if "__pycache__" in info.name else info)
        size = body.seek(0, os.SEEK_END)
        body.seek(0)
        request = urllib.request.Request(  # streamed from the file (urllib sends a file object in blocks)
            f"{args.edge.rstrip('/')}/admin/models/upload?{urllib.parse.urlencode(params)}", data=body, method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/gzip",
                     "Content-Length": str(size)})
        try:
            with urllib.request.urlopen(request, timeout=600) as resp:
                made = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text
            print(f"error: {exc.code}: {message}", file=sys.stderr)
            return 2 if 400 <= exc.code < 500 else 1
        except OSError as exc:
            print(f"error: {args.edge} could not be reached: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({k: made[k] for k in ("id", "triton_model", "settings", "price", "catalog_version", "upload")},
                     indent=2))
    return 0
