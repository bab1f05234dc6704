"""Load and unload Triton models at run time (Triton's explicit model control), and scale idle ones to zero.

Triton runs with ``--model-control-mode=explicit``: it loads the models it is told to (``--load-model``, every
model of the repository at start) and nothing else; ``RepositoryModelLoad`` / ``RepositoryModelUnload`` load and
unload one, and ``RepositoryIndex`` says what each model of the repository is (READY, UNAVAILABLE "unloaded",
LOADING, UNLOADING).

``ModelControl`` owns that for one executor:
- ``begin(model)`` / ``end(model)`` bracket every generation and embedding call (``ControlledBackend`` does it for
  the channel's sequences, ``using`` for ``Generate`` and ``Embed``): the live count and the last use per model;
- ``load(model)`` is single-flight per model (concurrent callers wait on one load); ``unload(model)`` waits until
  the model has no live work, releases the step backend's stream of the model (its attach is a request in flight,
  which would hold the unload), then unloads it and waits until Triton's index no longer says READY;
- the idle loop unloads a model whose ``idle_unload_s`` (catalog setting; 0 = never) has passed since its last
  use with nothing live: scale to zero. A request that reaches an unloaded model loads it again first
  (``ControlledBackend``), so the executor never fails a request because its model was unloaded under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from inferplane.common.errors import DeadlineExceeded, FailedPrecondition, InferplaneError, NotFound, Unavailable
from inferplane.common.tasks import spawn
from inferplane.executor.backend import GenerationBackend, SequenceSink
from inferplane.executor.triton_client import GenerateParams
from inferplane.v1 import common_pb2

log = logging.getLogger(__name__)

LOADED, UNLOADED = common_pb2.MODEL_STATE_LOADED, common_pb2.MODEL_STATE_UNLOADED
LOADING, UNLOADING = common_pb2.MODEL_STATE_LOADING, common_pb2.MODEL_STATE_UNLOADING
FAILED = common_pb2.MODEL_STATE_FAILED
# Triton's repository index states -> ours; UNAVAILABLE is "unloaded" unless its reason says a load failed
_INDEX_STATES = {"READY": LOADED, "LOADING": LOADING, "UNLOADING": UNLOADING}


def index_state(state: str, reason: str) -> int:
    """Our ``ModelState`` for one entry of Triton's repository index."""
    if state in _INDEX_STATES:
        return _INDEX_STATES[state]
    return UNLOADED if not reason or reason == "unloaded" else FAILED


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model of the repository as ``GetStatus`` reports it."""

    name: str
    state: int
    reason: str
    idle_s: float
    idle_unload_s: float


class ModelControl:
    """Explicit model control of one Triton (module docstring). ``idle_unload_s``: Triton model -> seconds idle
    before it is unloaded (0: never); its keys are the repository's models. ``release(model)`` closes whatever
    holds a request open on the model (the step backend's stream) before it unloads."""

    def __init__(self, url: str, idle_unload_s: Mapping[str, float], *,
                 release: Callable[[str], Awaitable[None]] | None = None, check_interval_s: float = 1.0,
                 drain_timeout_s: float = 600.0) -> None:
        self.url = url
        self.idle_unload_s = dict(idle_unload_s)
        self._release = release
        self._check_interval_s = check_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._triton = triton_aio.InferenceServerClient(url)
        now = time.monotonic()
        self.state: dict[str, int] = dict.fromkeys(self.idle_unload_s, LOADED)  # loaded at start (--load-model)
        self.live: dict[str, int] = dict.fromkeys(self.idle_unload_s, 0)
        self.last_used: dict[str, float] = dict.fromkeys(self.idle_unload_s, now)
        self._locks = {m: asyncio.Lock() for m in self.idle_unload_s}
        self._loads: dict[str, asyncio.Future[float]] = {}
        self._idle: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set whenever a live count drops (unload waits on it)

    @property
    def models(self) -> list[str]:
        return list(self.idle_unload_s)

    def manages(self, model: str) -> bool:
        return model in self.idle_unload_s

    def loaded(self, model: str) -> bool:
        return self.state.get(model) == LOADED

    def all_loaded(self, started: list[str] | None = None) -> None:
        """Triton (re)started: it loaded the models it was started with (``--load-model``: ``started``, None: all);
        the others (added since) are unloaded."""
        now = time.monotonic()
        for model in self.state:
            self.state[model] = LOADED if started is None or model in started else UNLOADED
            self.last_used[model] = now

    def add(self, model: str, idle_unload_s: float) -> None:
        """A model newly rendered into the repository (an upload), not loaded yet."""
        if model in self.state:
            return
        self.idle_unload_s[model] = idle_unload_s
        self.state[model] = UNLOADED
        self.live[model] = 0
        self.last_used[model] = time.monotonic()
        self._locks[model] = asyncio.Lock()
        if idle_unload_s and self._idle is None:
            self._idle = asyncio.create_task(self._idle_loop())

    def forget(self, model: str) -> None:
        """A model taken out of the repository (a deleted upload, unloaded first)."""
        for table in (self.idle_unload_s, self.state, self.live, self.last_used, self._locks):
            table.pop(model, None)

    # --- use ---------------------------------------------------------------------------------------------

    def begin(self, model: str) -> None:
        if model in self.live:
            self.live[model] += 1
            self.last_used[model] = time.monotonic()

    def end(self, model: str) -> None:
        if model in self.live:
            self.live[model] -= 1
            self.last_used[model] = time.monotonic()
            self._changed.set()

    @contextlib.asynccontextmanager
    async def using(self, model: str, request_id: str = "") -> AsyncIterator[None]:
        """Hold ``model`` for one call: loaded first when it is not (a unary or per-request call)."""
        self.begin(model)
        try:
            if self.manages(model) and not self.loaded(model):
                await self.load(model, request_id)
            yield
        finally:
            self.end(model)

    # --- load and unload ---------------------------------------------------------------------------------

    async def load(self, model: str, request_id: str = "") -> float:
        """Load ``model`` (single-flight); the seconds this caller waited (0 when it was loaded)."""
        if not self.manages(model):
            raise NotFound(f"model {model!r} is not in this executor's repository", param="model")
        if self.loaded(model):
            return 0.0
        task = self._loads.get(model)
        if task is None:
            task = self._loads[model] = asyncio.ensure_future(self._load(model, request_id))
            task.add_done_callback(lambda _t: self._loads.pop(model, None))
        started = time.monotonic()
        await asyncio.shield(task)  # a waiter that leaves does not cancel the others' load
        return time.monotonic() - started

    async def _load(self, model: str, request_id: str) -> float:
        async with self._locks[model]:
            if not self.manages(model):  # taken out of the repository while this load waited (a deleted upload)
                raise NotFound(f"model {model!r} is not in this executor's repository", param="model")
            if self.loaded(model):
                return 0.0
            self.state[model] = LOADING
            started = time.monotonic()
            log.info("progress: loading model %s into Triton (for %s)", model, request_id or "an admin")
            try:
                await self._triton.load_model(model)
            except InferenceServerException as exc:
                self.state[model] = FAILED
                log.error("model %s failed to load: %s", model, exc.message())
                raise FailedPrecondition(f"Triton could not load model {model!r}: {exc.message()}") from None
            except BaseException:
                self.state[model] = UNLOADED
                raise
            took = time.monotonic() - started
            self.state[model] = LOADED
            self.last_used[model] = time.monotonic()
            log.info("progress: model %s loaded in %.2fs (cold start)", model, took)
            return took

    async def unload(self, model: str, *, reason: str = "admin") -> None:
        """Unload ``model`` once nothing is live on it (bounded by ``drain_timeout_s``)."""
        if not self.manages(model):
            raise NotFound(f"model {model!r} is not in this executor's repository", param="model")
        async with self._locks[model]:
            if self.state[model] == UNLOADED:
                return
            self.state[model] = UNLOADING  # new work now waits for a load after this unload
            deadline = time.monotonic() + self._drain_timeout_s
            while self.live[model] > 0:
                self._changed.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    self.state[model] = LOADED
                    raise DeadlineExceeded(f"model {model!r} still has {self.live[model]} live requests")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 1.0)):
                        await self._changed.wait()
            started = time.monotonic()
            log.info("progress: unloading model %s (%s)", model, reason)
            if self._release is not None:
                await self._release(model)
            try:
                await self._triton.unload_model(model)
                await self._wait_unloaded(model, deadline)
            except InferenceServerException as exc:
                self.state[model] = LOADED if await self._ready(model) else UNLOADED
                raise FailedPrecondition(f"Triton could not unload model {model!r}: {exc.message()}") from None
            self.state[model] = UNLOADED
            log.info("progress: model %s unloaded in %.2fs (%s)", model, time.monotonic() - started, reason)

    async def _ready(self, model: str) -> bool:
        try:
            return bool(await self._triton.is_model_ready(model))
        except InferenceServerException:
            return False

    async def _wait_unloaded(self, model: str, deadline: float) -> None:
        """Triton may answer the unload before the model is gone: wait until its index no longer says READY."""
        while True:
            index = await self._triton.get_model_repository_index()
            entry = next((m for m in index.models if m.name == model), None)
            if entry is None or index_state(entry.state, entry.reason) not in (LOADED, UNLOADING):
                return
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"model {model!r} did not unload")
            await asyncio.sleep(0.1)

    async def index(self) -> list[ModelInfo]:
        """Triton's repository index, one ``ModelInfo`` per model (a load in flight shows as LOADING)."""
        resp = await self._triton.get_model_repository_index()
        now = time.monotonic()
        out = []
        for m in resp.models:
            state = index_state(m.state, m.reason)
            if self.state.get(m.name) in (LOADING, UNLOADING):
                state = self.state[m.name]
            idle = 0.0 if self.live.get(m.name) else now - self.last_used.get(m.name, now)
            out.append(ModelInfo(m.name, state, m.reason, idle, self.idle_unload_s.get(m.name, 0.0)))
        return out

    # --- scale to zero -----------------------------------------------------------------------------------

    def start(self, started: list[str] | None = None) -> None:
        """Triton is ready with ``started`` loaded (None: every model): the idle clocks start now (not when this
        object was built, before Triton loaded)."""
        self.all_loaded(self.models if started is None else started)
        if self._idle is None and any(self.idle_unload_s.values()):
            self._idle = asyncio.create_task(self._idle_loop())

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            now = time.monotonic()
            for model, idle_s in list(self.idle_unload_s.items()):  # a model may be forgotten meanwhile
                if (idle_s > 0 and self.state.get(model) == LOADED and self.live[model] == 0
                        and now - self.last_used[model] >= idle_s and not self._locks[model].locked()):
                    try:
                        await self.unload(model, reason=f"idle for {now - self.last_used[model]:.0f}s >= "
                                                        f"idle_unload_s {idle_s:g}")
                    except InferplaneError as exc:
                        log.warning("idle unload of %s failed: %s", model, exc)

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle
            self._idle = None
        await self._triton.close()


class _CountingSink:
    """Forwards a sequence's events and ends its use of the model once (finished or failed)."""

    __slots__ = ("control", "done", "model", "sink")

    def __init__(self, sink: SequenceSink, control: ModelControl, model: str) -> None:
        self.sink, self.control, self.model, self.done = sink, control, model, False

    def tokens(self, key: Hashable, token_ids: Sequence[int], logprobs: Sequence[float], top_k: int = 0,
               top_ids: Sequence[int] = (), top_logprobs: Sequence[float] = ()) -> None:
        self.sink.tokens(key, token_ids, logprobs, top_k, top_ids, top_logprobs)

    def finished(self, key: Hashable, reason: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> None:
        self._end()
        self.sink.finished(key, reason, prompt_tokens, completion_tokens, cached_tokens)

    def failed(self, key: Hashable, error: InferplaneError) -> None:
        self._end()
        self.sink.failed(key, error)

    def _end(self) -> None:
        if not self.done:
            self.done = True
            self.control.end(self.model)


class ControlledBackend:
    """A ``GenerationBackend`` that counts each sequence as a use of its model and, when the model is not loaded
    (scaled to zero, or unloading), loads it before opening the sequence on ``inner``."""

    def __init__(self, inner: GenerationBackend, control: ModelControl) -> None:
        self.inner = inner
        self.control = control
        self._pending: dict[Hashable, tuple[asyncio.Future[None], _CountingSink]] = {}

    def open(self, key: Hashable, model: str, params: GenerateParams, request_id: str, sink: SequenceSink) -> None:
        counted = _CountingSink(sink, self.control, model)
        self.control.begin(model)
        if not self.control.manages(model) or self.control.loaded(model):
            self.inner.open(key, model, params, request_id, counted)
            return
        self._pending[key] = (spawn(self._open_after_load(key, model, params, request_id, counted)), counted)

    async def _open_after_load(self, key: Hashable, model: str, params: GenerateParams, request_id: str,
                               sink: _CountingSink) -> None:
        try:
            await self.control.load(model, request_id)
        except InferplaneError as exc:
            if self._pending.pop(key, None) is not None:
                sink.failed(key, exc)
            return
        if self._pending.pop(key, None) is not None:
            self.inner.open(key, model, params, request_id, sink)

    def cancel(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            self.inner.cancel(key)
            return
        task, sink = pending
        task.cancel()
        asyncio.get_running_loop().call_soon(sink.finished, key, "cancelled", 0, 0)  # never from inside cancel

    async def close(self) -> None:
        for key, (task, sink) in list(self._pending.items()):
            task.cancel()
            sink.failed(key, Unavailable("the executor is closing"))
        self._pending.clear()
        await self.inner.close()
