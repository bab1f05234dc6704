"""The metering service's settings (file section ``metering``, environment ``INFERPLANE_METERING_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.assets import CATALOG
from inferplane.common.settings import ServerSettings, TelemetrySettings


class MeteringSettings(BaseSettings):
    """Everything the metering service (and the metering CLI) needs."""

    model_config = SettingsConfigDict(env_prefix="INFERPLANE_METERING_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50054)
    telemetry: TelemetrySettings = TelemetrySettings()
    # SQLAlchemy URL: SQLite file locally, PostgreSQL in production.
    database_url: str = "sqlite:///.inferplane/metering.db"
    # HMAC secret for key digests; when unset, read from (or created at) ``secret_file``.
    secret: SecretStr | None = None
    secret_file: Path = Path(".inferplane/metering-secret")
    # The model catalog whose ``prices`` seed the price table at start (skipped when the file is absent).
    catalog: Path | None = CATALOG
    # Seconds a budget reservation is held before it is given back (a crashed router's requests); longer than
    # the longest request plus the time a usage record may wait in a router's outbox.
    reservation_ttl_s: float = 900.0
    # Seconds between sweeps of expired reservations.
    sweep_interval_s: float = 30.0
