"""The tokenizer service's settings (file section ``tokenizer``, environment ``INFERPLANE_TOKENIZER_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.assets import CATALOG
from inferplane.common.settings import ServerSettings, TelemetrySettings


class TokenizerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_TOKENIZER_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50052)
    telemetry: TelemetrySettings = TelemetrySettings()
    # The model catalog; each model's ``tokenizer`` folder is loaded at start.
    catalog: Path = CATALOG
    # Metering, whose catalog (models added and deleted at run time: docs/catalog.md) is polled every
    # ``catalog_poll_s``; None (or 0 s): the catalog file is the catalog.
    metering_addr: str | None = None
    catalog_poll_s: float = 2.0
