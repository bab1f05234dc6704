"""`inferplane up` supervising its children, proven through the command itself (a subprocess):

- an executor SIGKILLed under 32 streams, and a tritonserver SIGKILLed under 32 streams: no request lost
  that had not started streaming, the stack keeps serving, the executor is SERVING again (time printed);
- a second `up` on a port the first one holds fails fast with one line naming the port;
- SIGHUP and SIGTERM (the latter during start-up) stop cleanly with exit 0 and leave no process behind;
- SIGKILL of `up` itself takes every process it started with it, tritonserver and its stubs included.

Two stacks in all (each start costs 30-60 s on 2 cores). Times are printed, never asserted: the waits
have generous deadlines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inferplane.cli.launcher import grpc_serving, read_env
from tests.e2e.procs import alive, cmdline, descendants, exe_name, wait_gone

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
MODEL = "tiny-llama"
START_TIMEOUT_S = 300.0


@dataclass
class Up:
    """One `inferplane up` subprocess, its output collected by a thread."""

    state: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, state: Path, *args: str) -> Up:
        proc = subprocess.Popen([sys.executable, "-m", "inferplane.cli", "up", "--state-dir", str(state),
                                 "--free-ports", "--ready-timeout", str(int(START_TIMEOUT_S)), *args],
                                cwd=state, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                # SIGHUP as a terminal sends it, even where this test runs under nohup
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
        up = cls(state, proc)
        threading.Thread(target=up._read, daemon=True).start()
        return up

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with (self.state / "up.out").open("a") as copy:  # kept for a failed run
            for line in self.proc.stdout:
                copy.write(line)
                copy.flush()
                with self.changed:
                    self.lines.append(line.rstrip("\n"))
                    self.changed.notify_all()
        self.proc.wait()
        with self.changed:
            self.changed.notify_all()  # the end of the output: a waiter sees the exit

    @property
    def output(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        with self.changed:
            ok = self.changed.wait_for(lambda: any(predicate(ln) for ln in self.lines) or self.proc.poll() is not None,
                                       timeout)
            found = [ln for ln in self.lines if predicate(ln)]
        assert ok and found, f"no such line in `inferplane up`'s output:\n{self.output}"
        return found[0]

    def wait_ready(self) -> None:
        self.wait_line(lambda ln: ln.startswith("Ctrl-C stops everything"), START_TIMEOUT_S + 30)

    @property
    def env(self) -> dict[str, str]:
        return read_env(self.state / "local.env")

    def executor_addr(self, section: str) -> str:
        server = yaml.safe_load((self.state / "stack.yaml").read_text())[section]["server"]
        return f"{server['host']}:{server['port']}"

    def generate_calls(self, section: str) -> float:
        """Generations the executor of ``section`` has run to their end (its own metrics; the router's arrive as
        sequences on its channel, Generate calls from anyone else)."""
        server = yaml.safe_load((self.state / "stack.yaml").read_text())[section]["server"]
        text = httpx.get(f"http://{server['host']}:{server['metrics_port']}/metrics", timeout=10).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "inferplane_executor_generations_finished_total")

    def service_pid(self, section: str) -> int:
        """The executor process serving ``section`` (executor, executor_2), a child of `up`."""
        for pid in descendants(self.proc.pid):
            args = cmdline(pid)
            if "serve" in args and "executor" in args and alive(pid):
                if (args[args.index("--section") + 1] if "--section" in args else "executor") == section:
                    return pid
        raise AssertionError(f"no {section} process under `inferplane up`")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def tritonserver_of(pid: int) -> int:
    found = [p for p in descendants(pid) if exe_name(p) == "tritonserver" and alive(p)]
    assert len(found) == 1, found
    return found[0]


def process_group(pgid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.add(int(entry.name))
            except (OSError, IndexError):
                continue
    return members


async def stream_one(http: httpx.AsyncClient, up: Up, *, max_tokens: int, started: asyncio.Event | None = None) -> dict:
    """One streaming completion: {'status', 'chunks', 'done', 'error'}."""
    env = up.env
    out: dict = {"status": None, "chunks": 0, "done": False, "error": None}
    body = {"model": MODEL, "prompt": "Return the", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with http.stream("POST", f"{env['INFERPLANE_BASE_URL']}/completions", json=body,
                           headers={"Authorization": f"Bearer {env['INFERPLANE_API_KEY']}"}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = (await r.aread()).decode()
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            obj = json.loads(line[6:])
            if "error" in obj:
                out["error"] = obj["error"]
                break
            out["chunks"] += 1
            if started is not None:
                started.set()
    return out


async def kill_under_32_streams(up: Up, victim: int) -> list[dict]:
    """SIGKILL ``victim`` while 32 streams run, send 8 more after it; every result."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        started = asyncio.Event()
        tasks = [asyncio.create_task(stream_one(http, up, max_tokens=150, started=started)) for _ in range(32)]
        await asyncio.wait_for(started.wait(), 60)
        os.kill(victim, signal.SIGKILL)  # the process alone, as the OOM killer does
        late = [asyncio.create_task(stream_one(http, up, max_tokens=20)) for _ in range(8)]
        return list(await asyncio.wait_for(asyncio.gather(*tasks, *late), 240))


def assert_none_lost(results: list[dict]) -> None:
    for r in results:
        assert r["status"] == 200, r  # not yet streaming when the victim died: retried on the other replica
        if r["error"] is not None:
            assert r["chunks"] >= 1, r  # only a stream that had started may end with an explicit error event
        else:
            assert r["done"], r
    assert all(r["done"] for r in results[32:]), results[32:]  # sent after the kill: served by the survivor


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


def launcher_restarts(up: Up, child: str) -> float:
    text = httpx.get(up.env["INFERPLANE_LAUNCHER_METRICS"], timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferplane_supervisor_restarts_total" and sample.labels.get("child") == child:
                return float(sample.value)
    return 0.0


@pytest.fixture(scope="module")
def up2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = Up.start(tmp_path_factory.mktemp("up2"), "--executors", "2")
    try:
        up.wait_ready()
        yield up
    finally:
        if up.proc.poll() is None:
            up.stop()


async def test_sigkill_of_an_executor_under_32_streams_restarts_it(up2: Up) -> None:
    victim = up2.service_pid("executor_2")
    old_triton = tritonserver_of(victim)
    old_stubs = process_group(old_triton) - {old_triton}
    assert old_stubs, "no Python-backend stub in tritonserver's group"
    t0 = time.monotonic()
    results = await kill_under_32_streams(up2, victim)
    assert_none_lost(results)
    back = await asyncio.to_thread(wait_until, lambda: grpc_serving(up2.executor_addr("executor_2")), 120,
                                   "executor_2 SERVING again")
    took = time.monotonic() - t0
    print(f"\nexecutor_2 SIGKILLed under 32 streams: SERVING again {took:.1f}s after the kill "
          f"({back:.1f}s after the streams ended); "
          f"{sum(r['error'] is not None for r in results)} started streams ended with an error event")
    up2.wait_line(lambda ln: ln.startswith("inferplane: executor_2 exited with -9; restarting (1st restart)"), 30)
    up2.wait_line(lambda ln: ln.startswith("inferplane: executor_2 ready again after"), 60)
    assert not alive(old_triton)  # the dead executor's tritonserver died with it (PDEATHSIG)
    _, left = wait_gone(old_stubs, 10)  # and its stubs (orphans: reparented to `up`, which kills them)
    assert not left, f"the dead executor's Triton stubs are still alive: {left}"
    assert up2.service_pid("executor_2") != victim
    assert launcher_restarts(up2, "executor_2") == 1
    # The router sends work to the new executor_2 once its ejection (backoff up to 30 s) is over; wait for
    # that, so that the next test's failover has a replica to go to.
    before = up2.generate_calls("executor_2")
    async with httpx.AsyncClient(timeout=60) as http:
        while up2.generate_calls("executor_2") == before:
            assert time.monotonic() - t0 < 180, "the router never sent work to executor_2 again"
            assert (await stream_one(http, up2, max_tokens=2))["done"]  # and the stack serves meanwhile
    print(f"router sends work to executor_2 again {time.monotonic() - t0:.1f}s after the kill")


async def test_sigkill_of_tritonserver_under_32_streams_restarts_it(up2: Up) -> None:
    executor = up2.service_pid("executor")
    old = tritonserver_of(executor)
    stubs = process_group(old) - {old}
    assert stubs, "no Python-backend stub in tritonserver's group"
    t0 = time.monotonic()
    results = await kill_under_32_streams(up2, old)
    assert_none_lost(results)

    def serving_with_a_new_triton() -> bool:
        current = [p for p in descendants(executor) if exe_name(p) == "tritonserver" and alive(p)]
        return bool(current) and current != [old] and grpc_serving(up2.executor_addr("executor"))

    await asyncio.to_thread(wait_until, serving_with_a_new_triton, 120, "executor SERVING with a new tritonserver")
    print(f"\ntritonserver SIGKILLed under 32 streams: executor SERVING again {time.monotonic() - t0:.1f}s after "
          f"the kill; {sum(r['error'] is not None for r in results)} started streams ended with an error event")
    _, left = wait_gone(stubs, 10)
    assert not left, f"the dead tritonserver's stubs are still alive: {left}"
    assert up2.proc.poll() is None and "executor exited" not in up2.output  # the executor itself lived on


async def test_sigkill_of_the_router_restarts_it_on_a_fresh_edge_socket(up2: Up) -> None:
    """The router's process also serves the REST edge, which Envoy reaches on ``STATE/gateway.sock``: SIGKILLed, it
    leaves that socket file behind; the restarted one replaces it and the public port serves again."""
    sock = up2.state / "gateway.sock"
    before = sock.stat().st_ctime_ns  # (not its inode number: ext4 may give the new file the same one)
    victim = next(p for p in descendants(up2.proc.pid) if alive(p) and "router-gateway" in cmdline(p))
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    up2.wait_line(lambda ln: ln.startswith("inferplane: router exited with -9; restarting (1st restart)"), 30)
    up2.wait_line(lambda ln: ln.startswith("inferplane: router ready again after"), 120)
    async with httpx.AsyncClient(timeout=60) as http:
        result = await stream_one(http, up2, max_tokens=2)
    print(f"\nrouter SIGKILLed: serving through Envoy again {time.monotonic() - t0:.1f}s after the kill")
    assert result["status"] == 200 and result["done"], result
    assert sock.is_socket() and sock.stat().st_ctime_ns != before  # a new file, bound by the new process
    assert launcher_restarts(up2, "router") == 1


def test_a_second_up_on_a_taken_port_fails_fast_naming_it(up2: Up, tmp_path: Path) -> None:
    edge = int(up2.env["INFERPLANE_BASE_URL"].rsplit(":", 1)[1].split("/")[0])
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "inferplane.cli", "up", "--state-dir", str(tmp_path),
                             "--free-ports", "--port", str(edge)], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    print(f"\nsecond `inferplane up` on a taken port: exit {second.returncode} after {took:.1f}s")
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [f"inferplane: port {edge} (edge) is already in use on 127.0.0.1"]
    assert not (tmp_path / "logs").exists()  # nothing was started
    assert up2.proc.poll() is None


def test_sighup_stops_cleanly_leaving_nothing(up2: Up) -> None:
    children = descendants(up2.proc.pid)
    assert any(exe_name(p) == "tritonserver" for p in children)
    up2.proc.send_signal(signal.SIGHUP)
    assert up2.proc.wait(60) == 0, up2.output
    took, left = wait_gone(children, 10)
    print(f"\nSIGHUP: `inferplane up` exited 0, every child gone after {took:.1f}s")
    assert not left, f"left behind after SIGHUP: {left}"


def test_sigterm_during_start_up_stops_cleanly_leaving_nothing(tmp_path: Path) -> None:
    up = Up.start(tmp_path)
    try:
        up.wait_line(lambda ln: "waiting for executor" in ln, START_TIMEOUT_S)  # Triton is loading its models
        children = descendants(up.proc.pid)
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0, up.output
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    took, left = wait_gone(children, 10)
    print(f"\nSIGTERM during start-up: exit 0, every child gone after {took:.1f}s")
    assert not left, f"left behind after SIGTERM: {left}"
    assert "Traceback" not in up.output, up.output


def test_sigkill_of_up_takes_every_process_it_started_with_it(tmp_path: Path) -> None:
    up = Up.start(tmp_path)
    try:
        up.wait_ready()
        children = descendants(up.proc.pid)
        names = {exe_name(p) for p in children}
        assert {"tritonserver", "triton_python_backend_stub", "envoy"} <= names, names
    except BaseException:
        up.stop()
        raise
    up.proc.kill()
    up.proc.wait()
    took, left = wait_gone(children, 30)
    print(f"\nSIGKILL of `inferplane up`: all {len(children)} processes it started gone after {took:.1f}s")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left behind: {[(p, exe_name(p)) for p in left]}"
