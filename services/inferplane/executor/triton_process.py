"""Run the tritonserver binary of the nvidia-pytriton wheel as a child process group.

    backends = prepare_backend_dir(cache_dir)
    with TritonProcess(model_repository, backend_dir=backends, log_path=log) as triton:
        triton.wait_ready(timeout=120, progress_cb=print)
        ... connect to f"127.0.0.1:{triton.grpc_port}" ...

What the launch needs (see docs/platform-notes.md): the Python backend stub for this interpreter copied into
``backends/python/`` (done by ``prepare_backend_dir``, outside site-packages); ``LD_LIBRARY_PATH`` led by
this interpreter's libpython directory (else Debian's system libpython 3.11.2 is picked up and model
initialisation fails), then the wheel's bundled libraries (the copied backend loses its ``$ORIGIN`` RPATH);
``PATH`` led by this interpreter's ``bin/`` so the stub runs the same virtual environment.

The process is run by ``inferplane.common.supervisor`` (one supervisor for every child in the project): its
own process group, PR_SET_PDEATHSIG (it dies if this process is killed outright; the supervisor forks from
its own long-lived thread, so ``start()`` may be called from any thread), and, when ``restart`` is given, a
tritonserver that exits is restarted with backoff and reported through ``on_event``. ``stop()`` sends
SIGTERM to tritonserver, waits ``exit_timeout_s`` plus a margin, then SIGKILLs the whole process group (the
Python stubs included). It also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType

from inferplane.common.ports import free_port
from inferplane.common.supervisor import ChildSpec, Event, RestartPolicy, Supervisor

log = logging.getLogger(__name__)

BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


class TritonError(RuntimeError):
    """tritonserver could not be started or did not become ready."""


def pytriton_root() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed nvidia-pytriton wheel."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("nvidia-pytriton is not installed: it provides the tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def tritonserver_binary() -> Path:
    return pytriton_root() / "bin" / "tritonserver"


def bundled_libs_dir() -> Path:
    return pytriton_root().parent.parent / "nvidia_pytriton.libs"


def prepare_backend_dir(cache_dir: str | Path) -> Path:
    """Build ``cache_dir/backends-pyX.Y/python/`` (backend + this Python's stub) and return the backends dir.

    Reused when already complete; built in a temporary folder and renamed, so concurrent callers are safe.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = pytriton_root()
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonError(f"no Python backend stub for Python {version} at {stub}")
    target = Path(cache_dir) / f"backends-py{version}"
    wanted = [*(root / "backends" / "python" / f for f in BACKEND_FILES), stub]
    if all(_same_file(f, target / "python" / f.name) for f in wanted):
        return target
    tmp = Path(cache_dir) / f".backends-py{version}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "python").mkdir(parents=True)
    for f in wanted:
        shutil.copy2(f, tmp / "python" / f.name)
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _same_file(src: Path, copy: Path) -> bool:
    return copy.exists() and copy.stat().st_size == src.stat().st_size


# Allocators Triton's release notes recommend over glibc's malloc, whose arenas keep freed memory in a
# long-running multithreaded server (RSS that only grows: "a false memory leak").
PREFERRED_ALLOCATORS = ("jemalloc", "tcmalloc_minimal", "tcmalloc")


def allocator_preload(choice: str) -> str | None:
    """What to put in tritonserver's ``LD_PRELOAD`` for ``choice``: "auto" (the first installed of
    ``PREFERRED_ALLOCATORS``, else none), "system" (none), or a library name or path (used as given)."""
    if choice == "system":
        return None
    if choice != "auto":
        return choice
    for name in PREFERRED_ALLOCATORS:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


class TritonProcess:
    """One tritonserver process serving ``model_repository``, on loopback ports picked at construction."""

    def __init__(
        self,
        model_repository: str | Path,
        *,
        backend_dir: str | Path,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        exit_timeout_s: int = 2,
        log_path: str | Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
        restart: RestartPolicy | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository)
        self.backend_dir = Path(backend_dir)
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.exit_timeout_s = exit_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.die_with_parent = die_with_parent
        self.restart = restart
        self._on_event = on_event
        self._supervisor: Supervisor | None = None
        self._log_offset = 0

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The current tritonserver process (a new one after each restart)."""
        return self._supervisor.proc("tritonserver") if self._supervisor is not None else None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        return [
            str(tritonserver_binary()),
            "--model-repository", str(self.model_repository),
            "--backend-directory", str(self.backend_dir),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--exit-timeout-secs", str(self.exit_timeout_s),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        lib_path = [libdir, str(bundled_libs_dir()), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_path if p)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        assert self._supervisor is None, "already started"
        self._supervisor = Supervisor(on_event=self._on_event)
        spec = ChildSpec("tritonserver", self.command(), env=self.environment(), log_path=self.log_path,
                         restart=self.restart, ready=self.is_ready, stop_timeout_s=self.exit_timeout_s + 5,
                         term_group=False,  # tritonserver unloads its models and lets the stubs finalize
                         die_with_parent=self.die_with_parent)
        if self.log_path is not None:
            self.log_path.write_bytes(b"")  # this run's log (restarts append to it)
        self._supervisor.start(spec)
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n_chars: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n_chars:].decode(errors="replace")

    def _new_log_lines(self) -> list[str]:
        if not self.log_path or not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # hand out whole lines only
        self._log_offset += end
        return chunk[:end].decode(errors="replace").splitlines()

    def wait_ready(self, timeout: float = 120.0, progress_cb: Callable[[str], None] | None = None) -> None:
        """Block until the server and all its models are ready; ``progress_cb`` gets each new log line."""
        assert self.proc is not None, "call start() first"
        deadline = time.monotonic() + timeout
        while True:
            if progress_cb is not None:
                for line in self._new_log_lines():
                    progress_cb(line)
            if self.proc.poll() is not None:
                raise TritonError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TritonError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def hold(self) -> None:
        """No more restarts: the server stays down if it exits from now on (the executor is draining)."""
        if self._supervisor is not None:
            self._supervisor.hold("tritonserver")

    def stop(self) -> int | None:
        """Stop the server and everything in its process group; returns its exit code."""
        sup, self._supervisor = self._supervisor, None
        if sup is None:
            return None
        atexit.unregister(self.stop)
        code = sup.stop("tritonserver")
        sup.close()
        return code

    def __enter__(self) -> TritonProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
