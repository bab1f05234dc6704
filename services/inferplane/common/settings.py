"""Typed settings shared by every service: one object per service, from a file and the environment.

Each service defines a ``pydantic_settings.BaseSettings`` subclass with its own ``env_prefix``
(``INFERPLANE_ROUTER_``, ...). ``load_settings`` builds it in ``main()`` from an optional YAML file
(its top-level section for the service) overridden by environment variables; nothing is read at
import time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


class TelemetrySettings(BaseModel):
    """OpenTelemetry set-up for one service."""

    # "none", "console", "file" (JSON lines at ``file_path``) or "otlp" (OTLP/gRPC to ``otlp_endpoint``).
    exporter: Literal["none", "console", "file", "otlp"] = "none"
    file_path: Path = Path(".inferplane/traces.jsonl")
    otlp_endpoint: str = "http://127.0.0.1:4317"
    # Where Triton (which speaks only OTLP/HTTP) sends its spans when the exporter is "otlp".
    otlp_http_traces_url: str = "http://127.0.0.1:4318/v1/traces"
    # Fraction of traces exported whole, chosen on the trace id (the same choice in every process). The rest
    # are recorded and exported only when they fail or take ``slow_request_s`` or more (tail sampling per
    # process): ``inferplane trace`` still finds every error and every slow request. 1.0 exports everything.
    sample_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    slow_request_s: float = Field(default=5.0, gt=0.0)


class ServerSettings(BaseModel):
    """Where and how a gRPC service listens."""

    host: str = "127.0.0.1"
    port: int = 0
    # Seconds in-flight RPCs get to finish after SIGTERM.
    grace_seconds: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Prometheus /metrics port on ``host``; None turns the endpoint off, 0 picks a free port.
    metrics_port: int | None = None


def load_settings(cls: type[S], *, config_file: Path | None = None, section: str | None = None,
                  **overrides: Any) -> S:
    """Build ``cls`` from ``config_file``'s ``section`` (YAML), then environment, then ``overrides``.

    Environment variables win over the file (pydantic-settings gives init arguments priority, so
    the file's values are passed as defaults through ``_file_defaults``).
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: expected a mapping at the top level")
        file_values = data.get(section, {}) if section else data
        if not isinstance(file_values, dict):
            raise ValueError(f"{config_file}: section {section!r} must be a mapping")
    env_only = cls()  # environment and defaults
    # Environment-provided fields override the file, nested ones field by field.
    merged = _deep_merge(file_values, env_only.model_dump(exclude_unset=True))
    merged = _deep_merge(merged, overrides)
    return cls(**merged)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def service_arguments(parser: argparse.ArgumentParser, section: str) -> argparse.ArgumentParser:
    """The arguments every service takes: its settings file and section, and a port override."""
    parser.add_argument("--config", type=Path, default=None, help=f"YAML settings file (section {section!r})")
    parser.add_argument("--section", default=section, help="the file's section to read")
    parser.add_argument("--port", type=int, default=None,
                        help="listen port (wins over the file and INFERPLANE_<SERVICE>_... variables)")
    return parser


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """``cls`` from ``service_arguments``: the one way a port is overridden (``--port``, else the environment,
    else the file), whether the service keeps it in ``server.port`` (gRPC services) or ``port`` (the gateway)."""
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides = {"server": {"port": args.port}} if "server" in cls.model_fields else {"port": args.port}
    return load_settings(cls, config_file=args.config, section=args.section, **overrides)
