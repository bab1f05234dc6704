"""Executor service: render the model repository, start and supervise Triton, serve the executor API.

Health is NOT_SERVING until Triton reports every model ready, and again whenever Triton is down; a
Triton that exits is restarted with backoff by the process supervisor (``inferplane.common.supervisor``)
and the executor is SERVING again once Triton is ready; an external Triton is polled instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import grpc

from inferplane.common import loop
from inferplane.common.catalog import Catalog, load_catalog
from inferplane.common.catalog_watch import CatalogWatcher, list_catalog_of
from inferplane.common.errors import InferplaneError
from inferplane.common.logs import setup_logging
from inferplane.common.server import GrpcServer
from inferplane.common.settings import service_arguments, settings_from_args
from inferplane.common.supervisor import Event, RestartPolicy
from inferplane.common.tasks import spawn
from inferplane.common.telemetry import head_sampled, setup_tracing
from inferplane.executor.block_book import BlockBook
from inferplane.executor.channel import ChannelService, PerRequestBackend
from inferplane.executor.kserve import passthrough
from inferplane.executor.model_control import ControlledBackend, ModelControl
from inferplane.executor.otlp_receiver import OtlpFileReceiver
from inferplane.executor.repository import remove_model, render_model, render_repository
from inferplane.executor.service import ExecutorServicer
from inferplane.executor.settings import ExecutorSettings
from inferplane.executor.triton_channel import TritonStepBackend
from inferplane.executor.triton_client import TritonLLMClient
from inferplane.executor.triton_process import TritonProcess, allocator_preload, prepare_backend_dir
from inferplane.v1 import executor_pb2_grpc

log = logging.getLogger(__name__)


class Executor:
    """The executor's server, its Triton process (when spawned) and the supervision loop."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        t = settings.triton
        self.catalog = load_catalog(settings.catalog)
        self.repo = t.work_dir.resolve() / "model_repository"
        self.triton_models = render_repository(self.catalog, self.repo, model_ids=settings.models or None,
                                               torch_threads=t.torch_threads)
        # What Triton loads when it starts (--load-model) and readiness waits for; uploads join triton_models only
        wanted = settings.load_at_start
        self.startup_models = [m for m in self.triton_models if wanted is None or m in wanted]
        if wanted is not None:
            if unknown := sorted(set(wanted) - set(self.triton_models)):
                log.warning("load_at_start names models not in the repository: %s", ", ".join(unknown))
            log.info("loaded at start: %s; on their first request: %s", ", ".join(self.startup_models) or "none",
                     ", ".join(m for m in self.triton_models if m not in self.startup_models) or "none")
        # Triton models rendered from metering's catalog since the start -> the folder each was rendered from
        self.adopted: dict[str, Path | None] = {}
        self._dropping: dict[str, asyncio.Future[None]] = {}  # adopted models the catalog no longer names
        self._catalog_now = self.catalog
        self._adopting = asyncio.Lock()
        self.watcher: CatalogWatcher | None = None
        self._metering: grpc.aio.Channel | None = None
        url = t.url or f"127.0.0.1:{t.grpc_port}"
        self.client = TritonLLMClient(url)
        # The channel's sequences run on a GenerationBackend (backend.py): one Triton stream per model carrying
        # every sequence and one response per model step (the step backend), or, for a model that cannot take it
        # (more than one instance), one Triton stream per sequence.
        self.per_request = PerRequestBackend(self.client)
        # What the models' prefix caches hold, as their step channels report it, for every router (precise
        # cache-aware routing).
        self.blocks = BlockBook()
        self.step = TritonStepBackend(url, fallback=self.per_request, on_blocks=self.blocks.apply)
        # Explicit model control (model_control.py): load/unload at run time, idle models scaled to zero.
        idle = idle_unload_times(self.catalog, self.triton_models)
        self.control = ModelControl(url, idle, release=self.step.release)
        self.channels = ChannelService(ControlledBackend(self.step, self.control), blocks=self.blocks)
        self.servicer = ExecutorServicer(self.client, self.triton_models, self.channels, control=self.control)
        self.server = GrpcServer(
            settings.server, service_names=["inferplane.v1.ExecutorService"], register=self._register,
            readiness=self._not_yet)
        self.process: TritonProcess | None = None
        self.receiver: OtlpFileReceiver | None = None
        if settings.telemetry.exporter == "file" and not t.url:
            ratio = settings.telemetry.sample_ratio
            self.receiver = OtlpFileReceiver(settings.telemetry.file_path,
                                             keep=None if ratio >= 1 else lambda tid: head_sampled(tid, ratio))
        self._supervisor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The process's exit status: 1 once Triton's supervisor gave up on it.
        self.exit_code = 0
        self._stopping = False

    def _register(self, server: grpc.aio.Server) -> None:
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(self.servicer, server)
        # the router's raw ``infer`` models: Triton's own service, passed through (executor/kserve.py)
        server.add_generic_rpc_handlers((passthrough(self.client.channel),))

    @staticmethod
    async def _not_yet() -> bool:
        return False

    def model_control_args(self) -> list[str]:
        """Explicit model control: Triton loads the repository's models at start (as before) and then only what
        ``LoadModel`` asks for, and unloads on ``UnloadModel`` or after a model's idle period."""
        return ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.startup_models)]

    def triton_trace_args(self) -> list[str]:
        """Triton's own OpenTelemetry tracing, into the same trace as the caller (``traceparent``)."""
        tel = self.settings.telemetry
        if self.receiver is not None:
            url = self.receiver.url
        elif tel.exporter == "otlp":
            url = tel.otlp_http_traces_url
        else:
            return []
        return [arg for kv in ("mode=opentelemetry", "rate=1", "level=TIMESTAMPS", f"opentelemetry,url={url}",
                               "opentelemetry,resource=service.name=triton", "opentelemetry,bsp_schedule_delay=200")
                for arg in ("--trace-config", kv)]

    def _spawn(self) -> TritonProcess:
        t = self.settings.triton
        work = t.work_dir.resolve()
        proc = TritonProcess(
            self.repo, backend_dir=prepare_backend_dir(work / "backends"), grpc_port=t.grpc_port,
            http_port=t.http_port, metrics_port=t.metrics_port, exit_timeout_s=t.exit_timeout_s,
            extra_args=[*self.model_control_args(), *self.triton_trace_args(), *t.extra_args],
            log_path=work / "tritonserver.log",
            env={"LD_PRELOAD": preload} if (preload := allocator_preload(t.allocator)) else None,
            restart=RestartPolicy(backoff_s=t.restart_backoff_s, max_backoff_s=t.restart_max_backoff_s),
            on_event=self._on_triton_event)
        log.info("tritonserver allocator: %s", preload or "system malloc")
        proc.start()
        return proc

    async def wait_triton_ready(self, timeout: float) -> None:
        started = time.monotonic()
        next_note = 0.0
        while not await self.client.is_ready(self.startup_models):
            waited = time.monotonic() - started
            if self.process is not None and not self.process.running:
                raise RuntimeError(f"tritonserver exited while loading; see {self.process.log_path}")
            if waited > timeout:
                raise TimeoutError(f"Triton not ready after {waited:.0f}s")
            if waited >= next_note:
                log.info("progress: Triton loading models %s (%.0fs)", ",".join(self.startup_models), waited)
                next_note = waited + 2.0
            await asyncio.sleep(0.25)
        self.servicer.triton_version = await self.client.server_version()
        log.info("progress: Triton %s ready with %s in %.1fs", self.servicer.triton_version,
                 ",".join(self.startup_models), time.monotonic() - started)

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        port = await self.server.start()
        if self.receiver is not None:
            self.receiver.start()
        if not self.settings.triton.url:
            self.process = self._spawn()
        await self.wait_triton_ready(self.settings.triton.ready_timeout_s)
        self.control.start(self.startup_models)
        if self.settings.metering_addr:
            self._metering = grpc.aio.insecure_channel(self.settings.metering_addr)
            self.watcher = CatalogWatcher(list_catalog_of(self._metering), self.settings.catalog.parent,
                                          self._catalog_changed, interval_s=self.settings.catalog_poll_s)
            self.watcher.start()
        await self.server.set_serving(True)
        if self.process is None:
            self._supervisor = asyncio.create_task(self._poll_external())
        return port

    def _catalog_changed(self, catalog: Catalog) -> None:
        spawn(self._adopt(catalog))

    async def _adopt(self, catalog: Catalog) -> None:
        """Follow metering's catalog (uploads): render and load the models it has and this repository lacks; a model
        adopted so that the catalog no longer names (a deleted upload) is dropped ``drop_after_s`` later. One change
        at a time, in the order they came."""
        async with self._adopting:
            self._catalog_now = catalog
            named = catalog_sources(catalog)
            for name in [n for n in self.adopted if not self._still_named(n, named) and n not in self._dropping]:
                self._dropping[name] = spawn(self._drop_later(name))
            await self._add_new(catalog)

    def _still_named(self, name: str, named: dict[str, Path | None]) -> bool:
        """The catalog still names adopted model ``name``: as its own (from the folder it was rendered from), or
        through another entry only (an alias of it). An upload of the same id from another folder is not it."""
        return name in named and named[name] in (None, self.adopted[name])

    async def _drop_later(self, name: str) -> None:
        """Unload ``name`` from Triton and take it out of the repository once the routers stopped sending it requests
        (``drop_after_s``), unless the catalog names it again (from the same folder) by then; then adopt whatever the
        catalog has under that name now (the same id uploaded again)."""
        log.info("progress: model %s is in no catalog model any more: unloading it in %gs", name,
                 self.settings.drop_after_s)
        await asyncio.sleep(self.settings.drop_after_s)
        async with self._adopting:
            try:
                if self._still_named(name, catalog_sources(self._catalog_now)):
                    log.info("progress: model %s is in the catalog again: kept", name)
                    return
                await self.control.unload(name, reason="deleted from the catalog")
                self.control.forget(name)
                self.triton_models.remove(name)
                del self.adopted[name]
                await asyncio.to_thread(remove_model, name, self.repo)
                log.info("progress: model %s unloaded and removed from the repository", name)
            except InferplaneError as exc:
                log.error("model %s could not be unloaded: %s", name, exc)
                return
            finally:
                self._dropping.pop(name, None)
            await self._add_new(self._catalog_now)

    async def _add_new(self, catalog: Catalog) -> None:
        wanted = self.settings.models
        for model in catalog.models:
            name = model.triton_model
            # a raw ``infer`` entry serves another entry's Triton model, unless it brought its own directory
            raw_alias = "infer" in model.tasks and model.triton_dir is None
            if ((model.checkpoint is None and model.triton_dir is None) or name in self.triton_models or raw_alias
                    or (wanted and model.id not in wanted)):
                continue
            try:
                threads = self.settings.triton.torch_threads
                await asyncio.to_thread(render_model, model, self.repo, torch_threads=threads)
            except (OSError, AssertionError, ValueError) as exc:
                log.error("model %s (%s) could not be rendered: %s", model.id, name, exc)
                continue
            self.triton_models.append(name)
            self.adopted[name] = model.triton_dir or model.checkpoint
            self.control.add(name, model.idle_unload_s)
            log.info("progress: model %s rendered into the repository as %s; loading it", model.id, name)
            try:
                await self.control.load(name, f"catalog: {model.id}")
            except InferplaneError as exc:
                log.error("model %s could not be loaded: %s", model.id, exc)

    def _on_triton_event(self, event: Event) -> None:
        """From the supervisor's thread: NOT_SERVING when tritonserver exits, SERVING when it is ready again."""
        if self._loop is None or self._stopping:
            return
        if event.kind in ("restarting", "exited", "gave_up"):
            asyncio.run_coroutine_threadsafe(self.server.set_serving(False), self._loop)
        if event.kind == "gave_up":
            # Triton keeps crashing: leave with a failure, so that whoever runs the executor (inferplane up's
            # supervisor, Kubernetes) restarts it afresh rather than keep a replica that never serves again.
            log.error("tritonserver keeps crashing; the executor stops with a failure so that it is restarted")
            self.exit_code = 1
            os.kill(os.getpid(), signal.SIGTERM)
        elif event.kind == "ready":
            asyncio.run_coroutine_threadsafe(self._triton_back(), self._loop)

    async def _triton_back(self) -> None:
        try:
            await self.wait_triton_ready(self.settings.triton.ready_timeout_s)
        except (RuntimeError, TimeoutError) as exc:  # died again while loading: the supervisor restarts it
            log.error("Triton restart failed: %s", exc)
            return
        self.control.all_loaded(self.startup_models)  # a restarted Triton loaded its --load-model ones again
        if not self._stopping:
            await self.server.set_serving(True)

    async def _poll_external(self) -> None:
        """An external Triton: follow its readiness."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            loaded = [m for m in self.triton_models if self.control.loaded(m)]  # unloaded ones are not a fault
            await self.server.set_serving(await self.client.is_ready(loaded))

    async def stop(self, grace: float | None = None) -> None:
        await self.drain()
        await self.server.stop(grace)
        await self.close()

    async def drain(self) -> None:
        """Before the server drains: Triton is no longer restarted, and channels refuse new sequences (the
        router retries them elsewhere) while their live ones run to their end."""
        await self.stop_supervising()
        self.channels.drain()

    async def stop_supervising(self) -> None:
        self._stopping = True
        if self.process is not None:
            self.process.hold()  # a Triton that exits from now on (we are draining) is not restarted
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    async def close(self) -> None:
        await self.stop_supervising()  # a Triton that exits because we stop it is not restarted
        for task in list(self._dropping.values()):
            task.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        if self._metering is not None:
            await self._metering.close(None)
        await self.channels.close()  # the step backend (it leaves its fallback to its owner)
        await self.control.close()
        await self.per_request.close()
        await self.client.close()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None


def catalog_sources(catalog: Catalog) -> dict[str, Path | None]:
    """Every Triton model the catalog names (any version of any model) -> the folder it is rendered from (its
    checkpoint or Triton directory; None: another entry's, or a model the repository was started with)."""
    named: dict[str, Path | None] = {}
    for m in catalog.models:
        for triton in m.versions.values():
            named.setdefault(triton, None)
        if m.triton_dir is not None or m.checkpoint is not None:
            named[m.triton_model] = m.triton_dir or m.checkpoint
    return named


def idle_unload_times(catalog: Catalog, triton_models: list[str]) -> dict[str, float]:
    """Each Triton model's ``idle_unload_s`` (the catalog entries that render it; the shortest nonzero one). A
    Triton model that an ``infer`` entry also names is never unloaded for idleness: its raw calls pass through
    unparsed, so the executor cannot tell when it was last used."""
    idle = dict.fromkeys(triton_models, 0.0)
    raw = {m.triton_model for m in catalog.models if "infer" in m.tasks}
    for m in catalog.models:
        if m.triton_model in idle and m.idle_unload_s and m.checkpoint is not None:
            if m.triton_model in raw:
                log.warning("%s: idle_unload_s ignored: an infer model also names %s", m.id, m.triton_model)
                continue
            idle[m.triton_model] = min(idle[m.triton_model] or m.idle_unload_s, m.idle_unload_s)
    return idle


async def run(settings: ExecutorSettings) -> int:
    """Serve until SIGTERM/SIGINT; the exit status (1 when Triton kept crashing)."""
    provider = setup_tracing("executor", settings.telemetry)
    executor = Executor(settings)
    try:
        await executor.start()
        await executor.server.serve_until_signal(before_drain=executor.drain)
    finally:
        await executor.close()
        provider.shutdown()
    return executor.exit_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferplane-executor", description="inferplane model executor")
    args = service_arguments(parser, "executor").parse_args(argv)  # --section executor_2, ...: other replicas
    setup_logging("executor")
    raise SystemExit(loop.run(run(settings_from_args(ExecutorSettings, args))))
