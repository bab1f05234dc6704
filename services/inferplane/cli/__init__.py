"""The ``inferplane`` console script: run the local stack, run one service, administer keys and usage."""

from __future__ import annotations

import argparse
import importlib
import sys

# service name -> module whose ``main(argv)`` serves it (a registry, not an if/elif chain)
SERVICES = {
    "router": "inferplane.router.main",
    "tokenizer": "inferplane.tokenizer.main",
    "executor": "inferplane.executor.main",
    "metering": "inferplane.metering.main",
    "gateway": "inferplane.gateway.main",
    # the router with the REST edge in its process (``inferplane up --edge in-router``)
    "router-gateway": "inferplane.cli.edge",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="inferplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from inferplane.cli.launcher import add_up_arguments

    add_up_arguments(sub.add_parser("up", help="run every service on loopback (Triton included) in the foreground"))

    serve = sub.add_parser("serve", help="run one service", add_help=False)
    serve.add_argument("service", choices=sorted(SERVICES))

    from inferplane.metering.cli import register as register_metering

    register_metering(sub)
    from inferplane.cli.trace import register as register_trace

    register_trace(sub)

    # `serve` hands everything after the service name to that service's own parser.
    if len(argv) >= 2 and argv[0] == "serve" and argv[1] in SERVICES:
        importlib.import_module(SERVICES[argv[1]]).main(argv[2:])
        return
    args = parser.parse_args(argv)
    if args.command == "up":
        from inferplane.cli.launcher import up as run_up

        raise SystemExit(run_up(args))
    handler = getattr(args, "func", None)
    if handler is None:
        parser.error(f"unknown command {args.command!r}")
    raise SystemExit(handler(args) or 0)


if __name__ == "__main__":
    main()
