"""``inferplane up``: every service as a process on loopback, with embedded defaults.

The launcher writes one settings file (``.inferplane/stack.yaml``, a section per service), starts
metering, executor (which starts Triton), router, gateway and Envoy (the edge, its config generated from the
same file into ``.inferplane/envoy.yaml``) as child processes (and the tokenizer service when the router
encodes or decodes through it), waits for each one's
readiness (gRPC health / HTTP / Envoy's admin ``/ready``), creates a demo API key, writes
``.inferplane/local.env`` and stays in the foreground. The base URL and gRPC address it prints are
Envoy's. SIGINT/SIGTERM/SIGHUP stop every child (and Triton under the executor), the edge first.

Every child runs on ``inferplane.common.supervisor``: it dies with the launcher (even a SIGKILLed one), and
once it has been ready a child that exits is restarted with backoff (the router fails over meanwhile) and
each restart is printed and counted (``inferplane_supervisor_restarts_total{child}`` on the launcher's own
metrics port, ``launcher_metrics``). A child that crashes 5 times within a minute stops the stack. Before
starting anything every port is checked free: a taken one fails fast with one line naming it.

With ``--autoscale MIN:MAX`` the stack starts MIN executors, the router follows the executors file
(``.inferplane/executors``) and ``inferplane.cli.autoscale`` adds and removes executors on their load.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferplane.assets import CATALOG
from inferplane.cli.autoscale import AutoscaleSettings, ExecutorScaler
from inferplane.common.metrics import start_metrics_server
from inferplane.common.ports import free_port
from inferplane.common.supervisor import CPU_POLICIES, ChildSpec, Event, RestartPolicy, Supervisor, last_line
from inferplane.edge.envoy import edge_settings, envoy_command, write_envoy_yaml
from inferplane.gateway.dashboard import ADMIN_KEY_VAR, DASHBOARD_URL_VAR, dashboard_url

# Default ports: clear of PostgreSQL 5432, Redis 6379, NATS 4222, RabbitMQ 5672, Mosquitto 1883, MariaDB 3306.
# "edge" is Envoy's listener (the one public port: REST and gRPC); its admin listens on loopback only.
DEFAULT_PORTS = {"edge": 8080, "envoy_admin": 9901, "gateway": 8081, "router": 50051, "tokenizer": 50052,
                 "executor": 50053, "metering": 50054, "triton_http": 18000, "triton_grpc": 18001,
                 "triton_metrics": 18002, "router_metrics": 9101, "tokenizer_metrics": 9102,
                 "executor_metrics": 9103, "metering_metrics": 9104, "launcher_metrics": 9105}
# The user's credentials (mode 0600): the keys, the dashboard's sign-in link; the one file of the stack with keys.
CREDENTIALS_FILE = "local.env"
# The gateway's Unix socket in the state directory (Envoy's upstream); Linux allows 108 bytes of path, NUL included.
GATEWAY_SOCKET = "gateway.sock"
UNIX_PATH_MAX = 108
START_ORDER = ["metering", "tokenizer", "executor", "router", "gateway", "envoy"]
# Where the REST edge runs: in the router's process (one event loop, no gRPC hop per token; the "router" child
# serves both, ``inferplane serve router-gateway``), or as its own "gateway" process calling the router over gRPC.
EDGE_MODES = ("in-router", "separate")
DEFAULT_EDGE_MODE = "in-router"
# Ports of each extra executor replica (executor_2, ...), by their offset from the first one's.
REPLICA_PORTS = ("executor", "triton_http", "triton_grpc", "triton_metrics", "executor_metrics")


def replica_names(n: int) -> list[str]:
    """Component names of n executor replicas: executor, executor_2, executor_3, ..."""
    return ["executor", *[f"executor_{i}" for i in range(2, n + 1)]]


def replica_port_key(key: str, replica: str) -> str:
    return key if replica == "executor" else f"{key}{replica.removeprefix('executor')}"


def with_replica_ports(ports: dict[str, int], n: int) -> dict[str, int]:
    """Add the ports of executors 2..n: each 10 above the previous one's (0 stays 0: a free port)."""
    out = dict(ports)
    for i, name in enumerate(replica_names(n)[1:], start=1):
        for key in REPLICA_PORTS:
            out.setdefault(replica_port_key(key, name), ports[key] + 10 * i if ports[key] else 0)
    return out
# The port a component is reported on, where it is not the one named after it.
PORT_OF = {"envoy": "edge"}
# Envoy's own log as JSON lines, like the services' logs (%j: the message, JSON-escaped).
ENVOY_LOG_FORMAT = '{"time":"%Y-%m-%dT%T.%fZ","level":"%l","service":"envoy","logger":"%n","message":"%j"}'


@dataclass
class StackConfig:
    """What ``up`` needs to know; everything else has embedded defaults."""

    state_dir: Path = Path(".inferplane")
    catalog: Path = CATALOG
    # Port per component; 0 picks a free one (the tests do this).
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    host: str = "127.0.0.1"
    trace_exporter: str = "file"
    # Traces exported whole (by trace id); the others only when they fail or are slow (``TelemetrySettings``).
    trace_sample_ratio: float = 0.01
    ready_timeout_s: float = 600.0
    # Overrides of the edge's settings (``inferplane.edge.envoy.EdgeSettings`` fields, e.g. request_timeout_s).
    edge: dict[str, Any] = field(default_factory=dict)
    # Executor replicas, each with its own Triton.
    executors: int = 1
    # Overrides of the router's settings (``RouterSettings`` fields, e.g. request_timeout_s).
    router: dict[str, Any] = field(default_factory=dict)
    # How a child that exits after it was ready is restarted; None: never (tests that kill on purpose).
    restart: RestartPolicy | None = field(default_factory=RestartPolicy)
    # Where the REST edge runs (``EDGE_MODES``).
    edge_mode: str = DEFAULT_EDGE_MODE
    # Executors that follow the load (``inferplane.cli.autoscale``); None: ``executors`` of them, fixed.
    autoscale: AutoscaleSettings | None = None
    # The scheduling policy of every child (``CPU_POLICIES``; Triton and its stubs inherit the executor's).
    # "batch": a process woken by a message does not preempt the one that sent it, so each relay works through
    # every message that is ready in one turn (docs/deployment.md, "CPU policy").
    cpu_policy: str = "batch"

    def __post_init__(self) -> None:
        assert self.edge_mode in EDGE_MODES, f"edge_mode must be one of {EDGE_MODES}, not {self.edge_mode!r}"
        assert self.cpu_policy in CPU_POLICIES, f"cpu_policy must be one of {sorted(CPU_POLICIES)}"
        if self.autoscale is not None:
            self.executors = self.autoscale.min_replicas

    def resolved_ports(self) -> dict[str, int]:
        """Every component's port; a 0 becomes a free port no other component of this stack was given (two
        random picks can coincide: a CI run gave Envoy's port to another child first)."""
        wanted = with_replica_ports(self.ports, self.executors)
        taken = {v for v in wanted.values() if v}
        out = {}
        for key, port in wanted.items():
            if not port:
                port = free_port()
                while port in taken:
                    port = free_port()
            taken.add(port)
            out[key] = port
        return out


def stack_settings(cfg: StackConfig, ports: dict[str, int]) -> dict[str, Any]:
    """The settings file every service reads (its own section)."""
    state = cfg.state_dir.resolve()
    telemetry = {"exporter": cfg.trace_exporter, "file_path": str(state / "traces.jsonl"),
                 "sample_ratio": cfg.trace_sample_ratio}

    def server(name: str) -> dict[str, Any]:
        return {"host": cfg.host, "port": ports[name], "grace_seconds": 5.0,
                "metrics_port": ports[f"{name}_metrics"]}

    addr = {name: f"{cfg.host}:{ports[name]}" for name in ("router", "tokenizer", "metering")}
    # The edge reaches the gateway on a Unix socket in the state directory (cheaper per streamed chunk than
    # loopback TCP), or on its TCP port where the path would be too long for a Unix socket address.
    gateway_socket = state / GATEWAY_SOCKET
    unix_socket = str(gateway_socket) if len(os.fsencode(gateway_socket)) < UNIX_PATH_MAX else ""
    replicas = replica_names(cfg.executors)
    executor_addrs = ([f"file://{state / 'executors'}"] if cfg.autoscale is not None else
                      [f"{cfg.host}:{ports[replica_port_key('executor', r)]}" for r in replicas])
    return {
        "metering": {"server": server("metering"), "telemetry": telemetry,
                     "database_url": f"sqlite:///{state / 'metering.db'}",
                     "secret_file": str(state / "metering-secret"), "catalog": str(cfg.catalog)},
        "tokenizer": {"server": server("tokenizer"), "telemetry": telemetry, "catalog": str(cfg.catalog),
                      "metering_addr": addr["metering"]},
        **{name: executor_section(cfg, ports, name) for name in replicas},
        "router": {"server": server("router"), "telemetry": telemetry, "catalog": str(cfg.catalog),
                   "tokenizer_addr": addr["tokenizer"], "metering_addr": addr["metering"],
                   "executor_addrs": executor_addrs,
                   "outbox_path": str(state / "router-outbox.db"), **cfg.router},
        "gateway": {"host": cfg.host, "port": ports["gateway"], "unix_socket": unix_socket,
                    "router_addr": addr["router"],
                    "metering_addr": addr["metering"], "uploads_dir": str(state / "uploads"),
                    "dashboard_credentials_file": str(state / CREDENTIALS_FILE),
                    # in the router's process the gateway reads the router's registry; apart, it scrapes it
                    "router_metrics_url": "" if cfg.edge_mode == "in-router" else
                    f"http://{cfg.host}:{ports['router_metrics']}/metrics",
                    "telemetry": telemetry},
        "edge": {"host": cfg.host, "port": ports["edge"], "admin_port": ports["envoy_admin"],
                 "gateway_addr": f"unix:{unix_socket}" if unix_socket else f"{cfg.host}:{ports['gateway']}",
                 "router_addr": addr["router"],
                 "access_log_path": str(state / "logs" / "edge-access.log"), **cfg.edge},
    }


def executor_section(cfg: StackConfig, ports: dict[str, int], replica: str,
                     load_at_start: list[str] | None = None) -> dict[str, Any]:
    """The settings of one executor replica (``executor``, ``executor_2``, ...); ``load_at_start``: the Triton
    models it loads when it starts (None: all)."""
    state = cfg.state_dir.resolve()
    extra: dict[str, Any] = {} if load_at_start is None else {"load_at_start": list(load_at_start)}

    def p(key: str) -> int:
        return ports[replica_port_key(key, replica)]

    return {"server": {"host": cfg.host, "port": p("executor"), "grace_seconds": 5.0,
                       "metrics_port": p("executor_metrics")},
            "telemetry": {"exporter": cfg.trace_exporter, "file_path": str(state / "traces.jsonl"),
                          "sample_ratio": cfg.trace_sample_ratio},
            "catalog": str(cfg.catalog),
            # metering's catalog: uploaded models are rendered and loaded (docs/model-control.md)
            "metering_addr": f"{cfg.host}:{ports['metering']}",
            "triton": {"grpc_port": p("triton_grpc"), "http_port": p("triton_http"),
                       "metrics_port": p("triton_metrics"), "work_dir": str(state / replica),
                       # one torch thread per model on small machines: two fight the services for 2 cores
                       "torch_threads": 1 if (os.cpu_count() or 1) <= 2 else 0}, **extra}


def grpc_serving(target: str, timeout: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class LocalStack:
    """The child processes of one local stack."""

    def __init__(self, cfg: StackConfig, *, log: Callable[[str], None] = print, reap_orphans: bool = False) -> None:
        """``reap_orphans``: only where this process has no other children (``inferplane up``), see
        ``Supervisor``."""
        self.cfg = cfg
        self.log = log
        self.ports = cfg.resolved_ports()
        self.state = cfg.state_dir.resolve()
        self.settings_file = self.state / "stack.yaml"
        self.settings = stack_settings(cfg, self.ports)
        self.interrupted = threading.Event()
        # Why the stack stopped by itself (a child that kept crashing), or None.
        self.failure: str | None = None
        self.supervisor = Supervisor(on_event=self._on_event, log_events=False,  # _on_event logs them
                                     reap_orphans=reap_orphans)
        self._metrics_started = False
        self._starting: set[str] = set()
        self.scaler: ExecutorScaler | None = None

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        """The current process of each component started (a restarted one's new process)."""
        out = {}
        for name in self.supervisor.names:
            proc = self.supervisor.proc(name)
            if proc is not None:
                out[name] = proc
        return out

    def _on_event(self, event: Event) -> None:
        if event.kind == "exited" and event.child in self._starting:
            return  # start-up reports it, with the log's last line
        self.log(f"inferplane: {event}")
        if event.kind == "gave_up":
            self.failure = f"{event}; stopping (last log line: {last_line(self._log_path(event.child))})"
            self.interrupted.set()

    def _log_path(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    @property
    def base_url(self) -> str:
        """Envoy's: REST callers go through the edge (``ports['gateway']`` is the gateway itself)."""
        return f"http://{self.cfg.host}:{self.ports['edge']}/v1"

    @property
    def grpc_addr(self) -> str:
        """Envoy's too: the edge routes the public RouterService (``ports['router']`` is the router itself)."""
        return f"{self.cfg.host}:{self.ports['edge']}"

    @property
    def envoy_file(self) -> Path:
        return self.state / "envoy.yaml"

    @property
    def edge_in_router(self) -> bool:
        return self.cfg.edge_mode == "in-router"

    def _ready(self, name: str) -> bool:
        if name == "gateway" or (name == "router" and self.edge_in_router):
            # the router's /healthz answers once both its gRPC server and its REST edge serve
            return http_ok(f"http://{self.cfg.host}:{self.ports['gateway']}/healthz")
        if name == "envoy":
            return http_ok(f"http://127.0.0.1:{self.ports['envoy_admin']}/ready")
        return grpc_serving(f"{self.cfg.host}:{self.ports[name]}")

    def _command(self, name: str) -> list[str]:
        if name == "envoy":
            workers = edge_settings(self.settings_file).workers
            return [*envoy_command(self.envoy_file, concurrency=workers or None), "--log-format", ENVOY_LOG_FORMAT]
        if name == "router" and self.edge_in_router:
            return [sys.executable, "-m", "inferplane.cli", "serve", "router-gateway", "--config",
                    str(self.settings_file)]
        if name.startswith("executor_"):  # another replica: the executor service with its own section
            return [sys.executable, "-m", "inferplane.cli", "serve", "executor", "--config", str(self.settings_file),
                    "--section", name]
        return [sys.executable, "-m", "inferplane.cli", "serve", name, "--config", str(self.settings_file)]

    @property
    def start_order(self) -> list[str]:
        i = START_ORDER.index("executor")
        order = [*START_ORDER[:i], *replica_names(self.cfg.executors), *START_ORDER[i + 1:]]
        skip = {*(() if self.uses_tokenizer_service else ("tokenizer",)),
                *(("gateway",) if self.edge_in_router else ())}
        return [n for n in order if n not in skip]

    @property
    def uses_tokenizer_service(self) -> bool:
        """The tokenizer service runs for a router that encodes or decodes through it (``tokenize`` or
        ``detokenize: remote``); by default the router does both in process and the service would sit idle."""
        return "remote" in (self.cfg.router.get("tokenize", "local"), self.cfg.router.get("detokenize", "local"))

    def metrics_url(self, name: str) -> str:
        """Where a component's Prometheus metrics are scraped: ``router``, ``executor_2``, ``triton``,
        ``triton_2``, ... (the gateway serves them on its own port; in the router's process, the same registry as the
        router's)."""
        if name == "gateway":
            return f"http://{self.cfg.host}:{self.ports['gateway']}/metrics"
        if name == "launcher":  # this process: the supervisor's restart counter
            return f"http://{self.cfg.host}:{self.ports['launcher_metrics']}/metrics"
        if name.startswith("triton"):
            key = "triton_metrics" + name.removeprefix("triton")
        elif name.startswith("executor"):
            key = replica_port_key("executor_metrics", name)
        else:
            key = f"{name}_metrics"
        return f"http://{self.cfg.host}:{self.ports[key]}/metrics"

    def spawn(self, name: str) -> None:
        """Start (or start again) one component, wait until it is ready, then supervise it."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        spec = ChildSpec(name, self._command(name), cwd=self.state, env=env, log_path=self._log_path(name),
                         restart=self.cfg.restart, ready=lambda: self._ready(name), stop_timeout_s=20.0,
                         cpu_policy=self.cfg.cpu_policy)
        self._starting.add(name)
        try:
            self.supervisor.start(spec, supervised=False)  # a death during start-up fails the start
            self._wait(name)
        finally:
            self._starting.discard(name)
        self.supervisor.supervise(name)

    def check_ports(self) -> None:
        """Fail before anything starts when a port the stack will bind is taken (another stack, a service)."""
        for key, port in self.ports.items():
            if key.startswith("tokenizer") and not self.uses_tokenizer_service:
                continue
            host = "127.0.0.1" if key == "envoy_admin" else self.cfg.host
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind (TIME_WAIT is fine)
                try:
                    sock.bind((host, port))
                except OSError:
                    raise PortInUseError(f"port {port} ({key}) is already in use on {host}") from None

    def start(self) -> None:
        self.check_ports()
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        self.write_settings()
        write_envoy_yaml(edge_settings(self.settings_file), self.envoy_file, source=str(self.settings_file))
        if not self._metrics_started:  # the supervisor's restart counter (and the launcher's process metrics)
            self.ports["launcher_metrics"] = start_metrics_server(self.cfg.host, self.ports["launcher_metrics"])
            self._metrics_started = True
        if self.cfg.autoscale is not None:  # the router reads it at start: the MIN executors, ready before it
            self.write_executors_file([self.executor_addr(n) for n in replica_names(self.cfg.executors)])
        for name in self.start_order:
            self.spawn(name)
        if self.cfg.autoscale is not None:
            self.scaler = ExecutorScaler(self, self.cfg.autoscale, log=self.log)
            self.scaler.start()

    def write_settings(self) -> None:
        """``stack.yaml``, replaced whole (a child restarting meanwhile never reads half of it)."""
        tmp = self.settings_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        tmp.replace(self.settings_file)

    # --- executor replicas (the autoscaler's) ---------------------------------------------------------

    @property
    def executors_file(self) -> Path:
        """The executor addresses every router follows under ``--autoscale`` (one ``host:port`` a line)."""
        return self.state / "executors"

    @property
    def executor_names(self) -> list[str]:
        return [n for n in self.settings if n == "executor" or n.startswith("executor_")]

    def executor_addr(self, name: str) -> str:
        return f"{self.cfg.host}:{self.ports[replica_port_key('executor', name)]}"

    def write_executors_file(self, addresses: list[str]) -> None:
        tmp = self.executors_file.with_suffix(".tmp")
        tmp.write_text("# executor replicas (inferplane up --autoscale); routers re-read this file\n"
                       + "".join(f"{a}\n" for a in addresses))
        tmp.replace(self.executors_file)

    def add_executor_section(self, load_at_start: list[str] | None = None) -> str:
        """A new replica's name (the lowest free ``executor_N``), free ports and settings section (``load_at_start``:
        the Triton models it loads when it starts; None: all)."""
        i = 2
        while f"executor_{i}" in self.settings:
            i += 1
        name = f"executor_{i}"
        taken = set(self.ports.values())
        for key in REPLICA_PORTS:
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            self.ports[replica_port_key(key, name)] = port
        self.settings[name] = executor_section(self.cfg, self.ports, name, load_at_start)
        self.write_settings()
        return name

    def remove_executor_section(self, name: str) -> None:
        assert name != "executor", "the first executor stays"
        self.settings.pop(name, None)
        for key in REPLICA_PORTS:
            self.ports.pop(replica_port_key(key, name), None)
        self.write_settings()

    def _wait(self, name: str) -> None:
        started = time.monotonic()
        last_note = 0.0
        while not self._ready(name):
            if self.interrupted.is_set():
                raise RuntimeError("interrupted while starting")
            proc = self.supervisor.proc(name)
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else None
                raise RuntimeError(f"{name} exited with {code} while starting: {last_line(self._log_path(name))} "
                                   f"(log: {self._log_path(name)})")
            waited = time.monotonic() - started
            if waited > self.cfg.ready_timeout_s:
                raise TimeoutError(f"{name} not ready after {waited:.0f}s; see {self.state / 'logs'}")
            if waited - last_note >= 5:
                last_note = waited
                self.log(f"  … waiting for {name} ({waited:.0f}s){self._progress_hint(name)}")
            time.sleep(0.2)
        port = self.ports[PORT_OF.get(name, name)]
        self.log(f"  ✓ {name} ready on {self.cfg.host}:{port} ({time.monotonic() - started:.1f}s)")

    def _progress_hint(self, name: str) -> str:
        """The last progress line the service logged (Triton loading models, …)."""
        path = self.state / "logs" / f"{name}.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        for line in reversed(lines[-50:]):
            if "progress" in line.lower() or "loading" in line.lower():
                return ": " + line.strip()[:160]
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every component's process group, the edge first; SIGKILL what is left after ``timeout``."""
        if self.scaler is not None:
            self.scaler.close(timeout=1.0)  # no new decision; an executor it is starting is stopped below
        self.supervisor.stop_all(timeout=timeout)
        if self.scaler is not None:
            self.scaler.close()

    def create_demo_key(self) -> str:
        return self._local_key("INFERPLANE_API_KEY", "demo", ["inference"])

    def create_admin_key(self) -> str:
        """The stack's admin key (the ``admin`` scope: /admin/* and the usage of every key)."""
        return self._local_key("INFERPLANE_ADMIN_KEY", "admin", ["admin"])

    def _local_key(self, env_name: str, name: str, scopes: list[str]) -> str:
        """The key kept in local.env under ``env_name`` while it still verifies with these scopes, else a new one."""
        from inferplane.metering.main import MeteringSettings, open_store

        store = open_store(MeteringSettings(**self.settings["metering"]))
        try:
            old = read_env(self.state / CREDENTIALS_FILE).get(env_name)
            if old:
                try:
                    if sorted(store.verify_key(old).scopes) == sorted(scopes):
                        return old
                except Exception:
                    pass
            _, key = store.create_key(name, scopes=scopes)
            return key
        finally:
            store.close()

    def dashboard_link(self) -> str:
        """A new sign-in link to the usage dashboard (``inferplane.gateway.dashboard``): a random login token, never
        an API key. It signs in once ``write_env`` has written it with the admin key, until the next link."""
        return dashboard_url(f"http://{self.cfg.host}:{self.ports['edge']}", secrets.token_urlsafe(32))

    def write_env(self, api_key: str, admin_key: str | None = None, dashboard_link: str | None = None) -> Path:
        env_file = self.state / CREDENTIALS_FILE
        values = {"INFERPLANE_BASE_URL": self.base_url, "INFERPLANE_GRPC_ADDR": self.grpc_addr,
                  "INFERPLANE_API_KEY": api_key, "INFERPLANE_LAUNCHER_METRICS": self.metrics_url("launcher")}
        if admin_key is not None:
            values[ADMIN_KEY_VAR] = admin_key
        if dashboard_link is not None:
            values[DASHBOARD_URL_VAR] = dashboard_link
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        env_file.chmod(0o600)
        return env_file


class PortInUseError(RuntimeError):
    """A port the stack needs is taken."""


def read_env(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(".inferplane"), help="where state, logs and traces go")
    parser.add_argument("--catalog", type=Path, default=CATALOG)
    parser.add_argument("--port", type=int, default=None,
                        help=f"the edge's port (Envoy: REST and gRPC; default {DEFAULT_PORTS['edge']}, or a free one "
                             "with --free-ports)")
    parser.add_argument("--executors", type=int, default=1, help="executor replicas, each with its own Triton")
    parser.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                        help="executor replicas that follow the load, between MIN and MAX (replaces --executors; "
                             "see docs/deployment.md)")
    parser.add_argument("--autoscale-target", type=float, default=AutoscaleSettings.target, metavar="N",
                        help="demand (active + queued sequences) per executor the autoscaler aims at "
                             "(default %(default)s)")
    parser.add_argument("--autoscale-windows", default=f"{AutoscaleSettings.stable_window_s:g}:"
                        f"{AutoscaleSettings.panic_window_s:g}", metavar="STABLE:PANIC",
                        help="the stable and the panic window in seconds (default %(default)s, Knative's)")
    parser.add_argument("--free-ports", action="store_true",
                        help="pick free ports for every component but the edge's --port when given "
                             "(several stacks side by side)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--trace-sample", type=float, default=StackConfig.trace_sample_ratio, metavar="RATIO",
                        help="fraction of requests traced whole; failed and slow ones always are (default "
                             "%(default)s; 1 traces every request)")
    parser.add_argument("--edge", choices=EDGE_MODES, default=DEFAULT_EDGE_MODE,
                        help="where the REST edge runs: in the router's process (no gRPC hop per token), or as a "
                             "separate gateway process (as compose and Kubernetes run it); see docs/deployment.md")
    parser.add_argument("--cpu-policy", choices=sorted(CPU_POLICIES), default=StackConfig.cpu_policy,
                        help="the Linux scheduling policy of every process of the stack: batch (SCHED_BATCH: a "
                             "process woken by a message does not preempt its sender; less CPU per token under "
                             "load) or normal (default %(default)s; see docs/deployment.md)")


def autoscale_settings(args: argparse.Namespace) -> AutoscaleSettings | None:
    if args.autoscale is None:
        return None
    low, high = AutoscaleSettings.parse_bounds(args.autoscale)
    stable, sep, panic = args.autoscale_windows.partition(":")
    try:
        windows = float(stable), float(panic)
    except ValueError:
        raise ValueError(f"--autoscale-windows takes STABLE:PANIC seconds, not {args.autoscale_windows!r}") from None
    if not sep or not 0 < windows[1] <= windows[0]:
        raise ValueError(f"--autoscale-windows needs 0 < PANIC <= STABLE, not {args.autoscale_windows!r}")
    if args.autoscale_target <= 0:
        raise ValueError("--autoscale-target must be positive")
    return AutoscaleSettings(min_replicas=low, max_replicas=high, target=args.autoscale_target,
                             stable_window_s=windows[0], panic_window_s=windows[1])


def autoscale_banner(autoscale: AutoscaleSettings | None) -> str:
    if autoscale is None:
        return ""
    return (f"  autoscale  {autoscale.min_replicas}..{autoscale.max_replicas} executors, target "
            f"{autoscale.target:g} active+queued per executor, windows {autoscale.stable_window_s:g}s stable / "
            f"{autoscale.panic_window_s:g}s panic\n")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def up(args: argparse.Namespace) -> int:
    if args.free_ports:
        ports = dict.fromkeys(DEFAULT_PORTS, 0) | ({"edge": args.port} if args.port else {})
    else:
        ports = dict(DEFAULT_PORTS, edge=args.port or DEFAULT_PORTS["edge"])
    try:
        autoscale = autoscale_settings(args)
    except ValueError as exc:
        print(f"inferplane: {exc}", file=sys.stderr, flush=True)
        return 2
    cfg = StackConfig(state_dir=args.state_dir, catalog=args.catalog.resolve(), ports=ports,
                      ready_timeout_s=args.ready_timeout, executors=max(1, args.executors), edge_mode=args.edge,
                      trace_sample_ratio=args.trace_sample, autoscale=autoscale, cpu_policy=args.cpu_policy)
    stack = LocalStack(cfg, log=lambda line: print(line, flush=True), reap_orphans=True)
    stop = stack.interrupted
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup SIGHUP stays ignored
            signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    try:
        stack.check_ports()
    except PortInUseError as exc:
        print(f"inferplane: {exc}", file=sys.stderr, flush=True)
        return 1
    print("inferplane: starting the local stack", flush=True)
    try:
        stack.start()
        key = stack.create_demo_key()
        admin_key = stack.create_admin_key()
        dashboard_link = stack.dashboard_link()
        env_file = stack.write_env(key, admin_key, dashboard_link)
        print(f"\ninferplane is ready in {time.monotonic() - started:.1f}s\n"
              f"  base URL   {stack.base_url}\n  gRPC       {stack.grpc_addr}\n  API key    {key}\n"
              f"  admin key  {admin_key}  (INFERPLANE_ADMIN_KEY: /admin/*, inferplane keys|prices|budgets|models)\n"
              f"  dashboard  {dashboard_link}\n"
              f"             (INFERPLANE_DASHBOARD_URL: signs this browser in as admin while the stack runs)\n"
              f"  env file   {env_file}\n  logs       {stack.state / 'logs'}\n"
              f"  metrics    {stack.metrics_url('launcher')}  (restarts of crashed services"
              f"{', autoscaler decisions' if autoscale else ''})\n"
              f"{autoscale_banner(autoscale)}\n"
              f"Try it:\n  curl {stack.base_url}/chat/completions \\\n"
              f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"tiny-llama\", \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"What does os.path.join do?\"}}], \"max_tokens\": 32}}'\n\n"
              "Ctrl-C stops everything.", flush=True)
        while not stop.wait(1.0):  # children are watched (and restarted) by the supervisor's thread
            pass
    except (RuntimeError, TimeoutError) as exc:
        if not (stop.is_set() and stack.failure is None):  # a stop signal during start-up is a clean stop
            print(f"inferplane: {exc}", file=sys.stderr, flush=True)
            return 1
    finally:
        print("inferplane: stopping", flush=True)
        stack.stop()
    if stack.failure is not None:
        print(f"inferplane: {stack.failure}", file=sys.stderr, flush=True)
        return 1
    return 0
