"""The executor's settings (file section ``executor``, or ``executor_2``... for more replicas; environment
``INFERPLANE_EXECUTOR_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.assets import CATALOG
from inferplane.common.settings import ServerSettings, TelemetrySettings


class TritonSettings(BaseModel):
    """The Triton server behind this executor: spawned here, or external (``url`` set)."""

    # host:port of an external Triton's gRPC endpoint; when empty the executor starts its own.
    url: str = ""
    grpc_port: int = 18001
    http_port: int = 18000
    metrics_port: int = 18002
    work_dir: Path = Path(".inferplane/executor")
    exit_timeout_s: int = 5
    # Restart of a tritonserver that exited: first after restart_backoff_s, doubling up to
    # restart_max_backoff_s; the supervisor gives up after 5 crashes within a minute.
    restart_backoff_s: float = 0.5
    restart_max_backoff_s: float = 30.0
    ready_timeout_s: float = 600.0
    # torch intra-op threads inside the model (0 = torch's default).
    torch_threads: int = 0
    # Extra tritonserver arguments (e.g. --trace-config ...).
    extra_args: list[str] = []
    # tritonserver's malloc: "auto" (jemalloc or tcmalloc when installed, through LD_PRELOAD), "system"
    # (glibc's), or a library name/path. Triton's release notes recommend one of the two: glibc's arenas can
    # hold freed memory in a long-running multithreaded server.
    allocator: str = "auto"


class ExecutorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_EXECUTOR_", env_nested_delimiter="__")

    server: ServerSettings = ServerSettings(port=50053)
    telemetry: TelemetrySettings = TelemetrySettings()
    catalog: Path = CATALOG
    # Catalog model ids this executor serves; empty means every model with a checkpoint.
    models: list[str] = []
    # Triton models of the repository loaded when Triton starts (None: all of them). The others stay unloaded
    # until a request or LoadModel asks for one (explicit model control, docs/model-control.md): the autoscaler
    # starts a new replica with only the models that took traffic, so that it serves sooner.
    load_at_start: list[str] | None = None
    # Metering's gRPC address: its catalog is polled (``catalog_poll_s``) and a model added with a checkpoint (an
    # upload) is rendered into the repository and loaded (docs/model-control.md). Empty: the catalog file only.
    metering_addr: str = ""
    catalog_poll_s: float = 2.0
    # A model this executor adopted from metering's catalog (an upload) that the catalog no longer names (deleted) is
    # unloaded and removed from the repository after this long: the routers (polling on their own clocks) stop
    # sending it requests first, and the ones under way end.
    drop_after_s: float = Field(default=10.0, ge=0)
    triton: TritonSettings = TritonSettings()
