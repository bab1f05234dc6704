"""One process supervisor for every child process the project starts (services, Envoy, tritonserver).

    sup = Supervisor(on_event=lambda e: print(f"inferplane: {e}"))
    sup.start(ChildSpec("executor", [...], log_path=..., ready=check), supervised=False)
    ... wait until ready ...
    sup.supervise("executor")        # from now on a crash is restarted with backoff
    ...
    sup.close()                      # SIGTERM to every group, wait, then SIGKILL

What it guarantees:
- Each child leads its own process group (``start_new_session``), so a stop signal reaches whatever the
  child spawned in that group (Triton's Python-backend stubs), and a dead child's leftovers are killed.
- Each child gets ``PR_SET_PDEATHSIG`` = SIGKILL: it dies when its parent dies, at every level (launcher →
  services → tritonserver). The kernel sends that signal when the *thread* that forked the child ends, so
  every child is forked by the supervisor's own thread, which lives until ``close()``. The prctl runs in a
  small exec wrapper (``exec_wrapper``), never in a ``preexec_fn``.
- A child may run under another scheduling policy (``ChildSpec.cpu_policy``), set by the same wrapper.
- A supervised child that exits without being asked is restarted after an exponential backoff (capped);
  one that crashes ``max_crashes`` times within ``window_s`` is given up (an event says so). Each restart
  is an event (for a log line) and a count in ``inferplane_supervisor_restarts_total{child}``.

Events are delivered on the supervisor's thread (or a readiness watcher's): handlers must be quick and must
not call back into ``start``/``stop`` of the same supervisor synchronously.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from prometheus_client import Counter

log = logging.getLogger(__name__)

RESTARTS = Counter("inferplane_supervisor_restarts_total", "Child processes restarted after they exited",
                   ["child"])

PR_SET_CHILD_SUBREAPER = 36
T = TypeVar("T")
EventKind = Literal["exited", "restarting", "restarted", "ready", "gave_up"]


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff ``backoff_s * 2**(n-1)`` for the n-th crash in ``window_s``, at most ``max_backoff_s``;
    the ``max_crashes``-th crash within ``window_s`` gives up."""

    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_crashes: int = 5
    window_s: float = 60.0

    def delay(self, crashes: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, crashes - 1)))


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child."""

    name: str
    argv: Sequence[str]
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    # stdout and stderr go here (appended); None: discarded.
    log_path: Path | None = None
    # None: never restarted (tests and benchmarks that kill children on purpose).
    restart: RestartPolicy | None = field(default_factory=RestartPolicy)
    # Polled after a restart; the "ready" event says when it first answered True.
    ready: Callable[[], bool] | None = None
    # SIGTERM → SIGKILL grace on stop.
    stop_timeout_s: float = 10.0
    # SIGTERM the whole group on stop (False: the leader only, and it stops its own children; tritonserver
    # unloads its models and lets the stubs finalize). SIGKILL always goes to the whole group.
    term_group: bool = True
    die_with_parent: bool = True
    # The Linux scheduling policy the child runs under, inherited by what it starts (``CPU_POLICIES``): "batch"
    # (SCHED_BATCH: a woken child does not preempt the running one, so a relay works through what is ready
    # before the next process runs) or None (the parent's policy).
    cpu_policy: str | None = None

    def __post_init__(self) -> None:
        assert self.cpu_policy is None or self.cpu_policy in CPU_POLICIES, f"unknown cpu_policy {self.cpu_policy!r}"


@dataclass(frozen=True)
class Event:
    """Something that happened to a child: the ``str`` is the line a log shows."""

    child: str
    kind: EventKind
    returncode: int | None = None
    restarts: int = 0  # restarts so far, this one included ("restarting": the one to come)
    seconds: float = 0.0  # "restarting": the backoff; "ready": since the crash; "gave_up": the window

    def __str__(self) -> str:
        nth = ordinal(self.restarts)
        if self.kind == "exited":
            return f"{self.child} exited with {self.returncode}"
        if self.kind == "restarting":
            return (f"{self.child} exited with {self.returncode}; restarting ({nth} restart) "
                    f"in {self.seconds:.1f}s")
        if self.kind == "restarted":
            return f"{self.child} restarted ({nth} restart)"
        if self.kind == "ready":
            return f"{self.child} ready again after {self.seconds:.1f}s ({nth} restart)"
        return (f"{self.child} exited with {self.returncode}, its {self.restarts}th crash within "
                f"{self.seconds:.0f}s; giving up")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# The scheduling policies a child may be given (``ChildSpec.cpu_policy``): name -> os.SCHED_*.
CPU_POLICIES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}

# Run first in the child, by a fresh interpreter that then execs the real command: PR_SET_PDEATHSIG (when
# argv[1] is a pid: SIGKILL at once if that parent died before), and the scheduling policy (argv[2], "-": keep).
# Not a ``preexec_fn``: Python code between fork and exec in a process with gRPC's threads crashed (SIGSEGV,
# gRPC's fork-handler aborts) or hung the child in about 1% of spawns; without one, subprocess uses vfork and
# runs no fork handlers at all.
_EXEC_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "if sys.argv[1] != '-':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "if sys.argv[2] != '-':\n"
    "    os.sched_setscheduler(0, getattr(os, sys.argv[2]), os.sched_param(0))\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def exec_wrapper(argv: Sequence[str], *, die_with_parent: bool = True, cpu_policy: str | None = None) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the thread that forks it (and so this process) ends, and under
    ``cpu_policy`` (``CPU_POLICIES``; None: the parent's)."""
    policy = CPU_POLICIES[cpu_policy] if cpu_policy is not None else "-"
    return [sys.executable, "-S", "-c", _EXEC_WRAPPER, str(os.getpid()) if die_with_parent else "-", policy, *argv]


def last_line(path: Path | None) -> str:
    """The last non-empty line of a log file ('' when there is none)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process of the group is left (killed stubs linger until their parent reaps them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):  # gone (or the pgid now belongs to someone else)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    supervised: bool = False
    stopping: bool = False
    gave_up: bool = False
    restarts: int = 0
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent crashes
    restart_at: float | None = None
    crashed_at: float = 0.0
    generation: int = 0  # bumped at each spawn: a readiness watcher of an older one stops


class Supervisor:
    """Starts, watches, restarts and stops child processes from one long-lived thread."""

    def __init__(self, *, on_event: Callable[[Event], None] | None = None, poll_s: float = 0.1,
                 log_events: bool = True, reap_orphans: bool = False) -> None:
        """``on_event`` gets every event; ``log_events``: also log each (off where ``on_event`` prints them).

        ``reap_orphans`` (a process whose only children are this supervisor's, e.g. ``inferplane up``): become
        a child subreaper, so that what a dead child leaves in *other* process groups (a SIGKILLed executor's
        tritonserver stubs, which outlive their server) is reparented here, and kill it. Not for a process
        that has other children (a test runner): they would be taken for orphans."""
        self._on_event = on_event
        self._log_events = log_events
        self._reap_orphans = reap_orphans
        self._next_orphan_scan = 0.0
        if reap_orphans:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._poll_s = poll_s
        self._children: dict[str, _Child] = {}
        self._lock = threading.RLock()
        self._calls: queue.Queue[tuple[Callable[[], object], concurrent.futures.Future[object]] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----

    def start(self, spec: ChildSpec, *, supervised: bool = True) -> subprocess.Popen[bytes]:
        """Start ``spec`` (again, if its earlier process has exited). ``supervised=False``: not restarted
        until ``supervise(name)`` (a launcher arms it once the child has been ready)."""
        with self._lock:
            old = self._children.get(spec.name)
            if old is not None and old.proc is not None and old.proc.poll() is None:
                raise RuntimeError(f"{spec.name} is still running")
            child = _Child(spec, supervised=supervised)
            self._children[spec.name] = child
        return self._on_thread(lambda: self._spawn(child))

    def supervise(self, name: str) -> None:
        with self._lock:
            self._children[name].supervised = True

    def hold(self, name: str) -> None:
        """No more restarts of ``name`` (it is being stopped by other means, e.g. its parent drains)."""
        with self._lock:
            child = self._children[name]
            child.supervised = False
            child.restart_at = None

    def proc(self, name: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            child = self._children.get(name)
            return child.proc if child is not None else None

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._children)

    def restarts(self, name: str) -> int:
        with self._lock:
            return self._children[name].restarts

    def stop(self, name: str) -> int | None:
        """Stop one child and its group; returns its exit code (None if it never ran)."""
        return self.stop_all([name]).get(name)

    def stop_all(self, names: Sequence[str] | None = None, timeout: float | None = None) -> dict[str, int | None]:
        """SIGTERM each child (in ``names`` order, default: the reverse of the start order), wait for all
        up to their stop timeout (or ``timeout``), then SIGKILL each whole group."""
        with self._lock:
            order = list(names) if names is not None else list(reversed(self._children))
            children = [self._children[n] for n in order if n in self._children]
            for child in children:
                child.stopping = True  # no restart of what we stop
                child.restart_at = None
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                if child.spec.term_group:
                    kill_group(child.proc.pid, signal.SIGTERM)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGTERM)
        wait = timeout if timeout is not None else max((c.spec.stop_timeout_s for c in children), default=0.0)
        deadline = time.monotonic() + wait
        codes: dict[str, int | None] = {}
        for child in children:
            proc = child.proc
            if proc is None:
                codes[child.spec.name] = None
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            kill_group(proc.pid, signal.SIGKILL)  # whatever did not stop in time, and anything it left
            codes[child.spec.name] = proc.wait()
            if not wait_group_gone(proc.pid, 5.0):
                log.warning("processes of %s's group %d still exist 5s after SIGKILL", child.spec.name, proc.pid)
        if self._reap_orphans:  # what the stopped children left in other groups (a killed executor's stubs)
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < 0.5:
                if self._kill_orphans():
                    quiet_since = time.monotonic()
                time.sleep(0.05)
        return codes

    def close(self, timeout: float | None = None) -> None:
        """Stop every child and end the supervisor's thread."""
        if self._closed:
            return
        self.stop_all(timeout=timeout)
        self._closed = True
        self._calls.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    # ---- the supervisor's thread ----

    def _on_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the supervisor's thread (children must be forked there: PDEATHSIG)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed:
            raise RuntimeError("supervisor is closed")
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._calls.put((fn, fut))
        return fut.result()  # type: ignore[return-value]

    def _run(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self._poll_s)
            except queue.Empty:
                call = None
            else:
                if call is None:
                    return
                fn, fut = call
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller
                    fut.set_exception(exc)
            try:
                self._watch()
                if self._reap_orphans and time.monotonic() >= self._next_orphan_scan:
                    self._kill_orphans()
                    self._next_orphan_scan = time.monotonic() + 1.0
            except Exception:  # the watcher must outlive any one bad event handler
                log.exception("supervisor watch failed")

    def _kill_orphans(self) -> int:
        """SIGKILL and reap the processes reparented to this one (see ``reap_orphans``); how many."""
        with self._lock:
            ours = {c.proc.pid for c in self._children.values() if c.proc is not None}
        me = os.getpid()
        killed = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in ours:
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                pid = int(entry.name)
                log.warning("killing orphan %d left by a dead child", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                killed += 1
        return killed

    def _spawn(self, child: _Child) -> subprocess.Popen[bytes]:
        spec = child.spec
        out: int | object = subprocess.DEVNULL
        if spec.log_path is not None:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = spec.log_path.open("ab")
        wrapped = spec.die_with_parent or spec.cpu_policy is not None
        argv = (exec_wrapper(spec.argv, die_with_parent=spec.die_with_parent, cpu_policy=spec.cpu_policy)
                if wrapped else list(spec.argv))
        try:
            child.proc = subprocess.Popen(
                argv, cwd=spec.cwd, env=dict(spec.env) if spec.env is not None else None,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,  # type: ignore[arg-type]
                start_new_session=True)
        finally:
            if not isinstance(out, int):
                out.close()  # type: ignore[attr-defined]
        child.generation += 1
        return child.proc

    def _watch(self) -> None:
        now = time.monotonic()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            proc = child.proc
            if child.stopping or child.gave_up or proc is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
                continue
            code = proc.poll()
            if code is None:
                continue
            kill_group(proc.pid, signal.SIGKILL)  # what the dead child left in its group (model stubs)
            policy = child.spec.restart
            if not child.supervised or policy is None:
                child.stopping = True  # exited for good: reported once
                self._emit(Event(child.spec.name, "exited", code, child.restarts))
                continue
            child.crashes = [t for t in child.crashes if now - t < policy.window_s] + [now]
            child.crashed_at = now
            if len(child.crashes) >= policy.max_crashes:
                child.gave_up = True
                self._emit(Event(child.spec.name, "gave_up", code, len(child.crashes), policy.window_s))
                continue
            delay = policy.delay(len(child.crashes))
            child.restart_at = now + delay
            self._emit(Event(child.spec.name, "restarting", code, child.restarts + 1, delay))

    def _restart(self, child: _Child) -> None:
        child.restart_at = None
        if child.proc is not None:
            wait_group_gone(child.proc.pid, 2.0)  # the old group's last members were SIGKILLed at the crash
        try:
            self._spawn(child)
        except OSError as exc:  # e.g. the binary vanished: counts as one more crash
            log.error("could not restart %s: %s", child.spec.name, exc)
            child.proc = None
            child.gave_up = True
            self._emit(Event(child.spec.name, "gave_up", None, len(child.crashes)))
            return
        child.restarts += 1
        RESTARTS.labels(child=child.spec.name).inc()
        self._emit(Event(child.spec.name, "restarted", None, child.restarts))
        if child.spec.ready is not None:
            threading.Thread(target=self._watch_ready, args=(child, child.generation), daemon=True,
                             name=f"ready-{child.spec.name}").start()

    def _watch_ready(self, child: _Child, generation: int) -> None:
        ready = child.spec.ready
        assert ready is not None
        while child.generation == generation and not child.stopping and not self._closed:
            proc = child.proc
            if proc is None or proc.poll() is not None:
                return
            if ready():
                self._emit(Event(child.spec.name, "ready", None, child.restarts, time.monotonic() - child.crashed_at))
                return
            time.sleep(0.2)  # a plain thread polling a health check, not async code

    def _emit(self, event: Event) -> None:
        if self._log_events:
            level = {"restarted": logging.INFO, "ready": logging.INFO, "gave_up": logging.ERROR}
            log.log(level.get(event.kind, logging.WARNING), "%s", event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("supervisor event handler failed on %s", event)
