"""The gateway's settings (file section ``gateway``, environment ``INFERPLANE_GATEWAY_*``)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.common.settings import TelemetrySettings


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_GATEWAY_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    # 0 picks a free port (``GatewayServer.port`` tells which).
    port: int = 8081  # behind the edge (Envoy, 8080)
    # Also listen on this Unix socket ("" = TCP only): the edge's upstream when both run on one machine
    # (``inferplane up``). A small write costs about half as much on a Unix socket as on loopback TCP, for the
    # writer and for the reader, and every streamed chunk is one (docs/benchmarks.md, "round three").
    unix_socket: str = ""
    router_addr: str = "127.0.0.1:50051"
    # Metering's gRPC address, for /v1/usage and the /admin routes.
    metering_addr: str = "127.0.0.1:50054"
    # Largest request body accepted, counted on the bytes actually read (413 beyond).
    max_body_bytes: int = 1024 * 1024
    # POST /admin/models/upload (docs/model-control.md): where uploaded checkpoints are unpacked (executors read
    # them from there: the same machine, or a shared volume), "" = no upload route; its own body limit.
    uploads_dir: str = ""
    max_upload_bytes: int = 2 << 30
    # The usage dashboard (/dashboard/, docs/dashboard.md): the credentials file ``inferplane up`` writes (its
    # sign-in link and admin key; "" = no link sign-in), and where the router's Prometheus metrics are read for
    # the latency percentiles ("" = this process's registry: the gateway in the router's process).
    dashboard_credentials_file: str = ""
    router_metrics_url: str = ""
    # gRPC deadline of one router call.
    request_timeout_s: float = 600.0
    # Seconds in-flight requests (streams included) get to finish after SIGTERM.
    grace_seconds: float = 10.0
    # Seconds an idle keep-alive connection stays open. Longer than the edge's upstream idle timeout
    # (inferplane.edge.envoy UPSTREAM_IDLE_TIMEOUT_S), so the proxy always closes first: a server that closes a
    # pooled connection just as the proxy sends a request on it is a reset the client sees as a 503.
    keep_alive_s: float = 75.0
    telemetry: TelemetrySettings = TelemetrySettings()
