"""The process supervisor with a fake child (a sleeping Python): restart with backoff, give-up, stop, and
children that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from inferplane.common.supervisor import ChildSpec, Event, RestartPolicy, Supervisor, last_line, ordinal

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
FAST = RestartPolicy(backoff_s=0.05, max_backoff_s=0.2, max_crashes=5, window_s=60)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def restarts_counted(child: str) -> float:
    return REGISTRY.get_sample_value("inferplane_supervisor_restarts_total", {"child": child}) or 0.0


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def sup(events: list[Event]) -> Iterator[Supervisor]:
    s = Supervisor(on_event=events.append, poll_s=0.02)
    yield s
    s.close(timeout=2)


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]


def test_backoff_doubles_up_to_its_cap() -> None:
    p = RestartPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_killed_child_is_restarted_counted_and_reported_ready(sup: Supervisor, events: list[Event],
                                                                tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    before = restarts_counted("sleeper")
    first = sup.start(ChildSpec("sleeper", SLEEPER, restart=FAST, ready=marker.exists))
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: any(e.kind == "restarted" for e in events), 10, "a restart")
    second = sup.proc("sleeper")
    assert second is not None and second.pid != first.pid and second.poll() is None
    assert not any(e.kind == "ready" for e in events)  # not ready until the check says so
    marker.touch()
    wait_for(lambda: any(e.kind == "ready" for e in events), 10, "ready again")
    kinds = [e.kind for e in events]
    assert kinds == ["restarting", "restarted", "ready"], events
    assert str(events[0]).startswith("sleeper exited with -9; restarting (1st restart)")
    assert str(events[2]).startswith("sleeper ready again after ")
    assert sup.restarts("sleeper") == 1
    assert restarts_counted("sleeper") == before + 1


def test_an_unsupervised_child_is_reported_once_and_not_restarted(sup: Supervisor, events: list[Event]) -> None:
    proc = sup.start(ChildSpec("once", SLEEPER, restart=FAST), supervised=False)
    proc.kill()
    wait_for(lambda: bool(events), 10, "the exit event")
    time.sleep(0.3)  # several watch rounds: still no restart
    assert [e.kind for e in events] == ["exited"]
    assert sup.proc("once") is proc
    again = sup.start(ChildSpec("once", SLEEPER, restart=FAST))  # started again by hand
    assert again.pid != proc.pid and again.poll() is None


def test_a_crash_loop_gives_up(sup: Supervisor, events: list[Event], tmp_path: Path) -> None:
    log = tmp_path / "crash.log"
    crash = [sys.executable, "-c", "import sys; print('bad setting: port'); sys.exit(3)"]
    sup.start(ChildSpec("crasher", crash, restart=FAST, log_path=log))
    wait_for(lambda: any(e.kind == "gave_up" for e in events), 20, "give-up")
    assert [e.kind for e in events].count("restarted") == FAST.max_crashes - 1
    assert str(events[-1]) == "crasher exited with 3, its 5th crash within 60s; giving up"
    assert last_line(log) == "bad setting: port"


def test_stop_terms_the_group_and_kills_what_ignores_it(sup: Supervisor) -> None:
    stubborn = [sys.executable, "-c", "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                "print('up', flush=True); time.sleep(60)"]
    proc = sup.start(ChildSpec("stubborn", stubborn, stop_timeout_s=0.5), supervised=True)
    wait_for(lambda: len(group(proc.pid)) == 2, 10, "the grandchild")
    members = group(proc.pid)
    t0 = time.monotonic()
    assert sup.stop("stubborn") == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert not any(alive(p) for p in members)


def test_a_child_that_stops_on_sigterm_exits_cleanly(sup: Supervisor) -> None:
    proc = sup.start(ChildSpec("polite", SLEEPER))
    assert sup.stop("polite") == -signal.SIGTERM
    assert proc.poll() is not None


def group(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


PARENT = """
import sys, threading, time
from inferplane.common.supervisor import ChildSpec, Supervisor
sup, kids = [], []
# Both the supervisor and the start call come from threads that end at once.
for fn in (lambda: sup.append(Supervisor()),
           lambda: kids.append(sup[0].start(ChildSpec("kid", [sys.executable, "-c", "import time; time.sleep(60)"])))):
    t = threading.Thread(target=fn)
    t.start()
    t.join()
time.sleep(0.5)
print(kids[0].pid, flush=True)
time.sleep(60)
"""


def test_children_die_with_their_parent_even_when_started_from_a_short_lived_thread() -> None:
    """The child is forked by the supervisor's own thread, so it outlives the thread that asked for it,
    and dies when the parent process is SIGKILLed."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert parent.stdout is not None
        kid = int(parent.stdout.readline())
        assert alive(kid), "the child died with the short-lived thread that asked for it"
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(kid), 5, "the child to die with its parent")
    finally:
        parent.kill()
        parent.wait()


def test_start_refuses_a_running_child(sup: Supervisor) -> None:
    sup.start(ChildSpec("one", SLEEPER))
    with pytest.raises(RuntimeError, match="still running"):
        sup.start(ChildSpec("one", SLEEPER))


def test_events_from_another_thread_do_not_block_start(sup: Supervisor) -> None:
    done = threading.Event()
    threading.Thread(target=lambda: (sup.start(ChildSpec("t", SLEEPER)), done.set())).start()
    assert done.wait(10)


def test_children_start_cleanly_while_grpc_threads_run(sup: Supervisor, events: list[Event]) -> None:
    """The launcher forks while gRPC's threads run (its health checks). Python code between fork and exec
    (a ``preexec_fn``) crashed or hung some children there; every child must exec and exit 0."""
    from inferplane.cli.launcher import grpc_serving

    stop = threading.Event()

    def health_checks() -> None:
        while not stop.is_set():
            grpc_serving("127.0.0.1:1", timeout=0.05)

    threads = [threading.Thread(target=health_checks, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        codes = []
        for _ in range(100):
            proc = sup.start(ChildSpec("true", ["/bin/true"], restart=None))
            codes.append(proc.wait(10))
    finally:
        stop.set()
    assert codes == [0] * 100


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_a_child_runs_under_its_cpu_policy_and_its_own_children_inherit_it(sup: Supervisor, tmp_path: Path,
                                                                           die_with_parent: bool) -> None:
    """``cpu_policy="batch"``: the child and what it starts run under SCHED_BATCH (as Triton under the executor);
    without one the child keeps the parent's policy."""
    out = tmp_path / "policies.txt"
    grandchild = "import os; print(os.sched_getscheduler(0))"
    script = ("import os, subprocess, sys\n"
              f"own = os.sched_getscheduler(0)\n"
              f"child = subprocess.run([sys.executable, '-c', {grandchild!r}], capture_output=True, text=True)\n"
              f"open({str(out)!r}, 'w').write(f'{{own}} {{child.stdout.strip()}}')\n")
    sup.start(ChildSpec("batched", [sys.executable, "-c", script], restart=None, cpu_policy="batch",
                        die_with_parent=die_with_parent), supervised=False)
    wait_for(lambda: out.exists() and out.read_text().count(" ") == 1, 30, "the child's report")
    assert out.read_text().split() == [str(os.SCHED_BATCH)] * 2
    plain = tmp_path / "plain.txt"
    sup.start(ChildSpec("plain", [sys.executable, "-c", f"import os; open({str(plain)!r}, 'w').write("
                                  "str(os.sched_getscheduler(0)))"], restart=None), supervised=False)
    wait_for(lambda: plain.exists() and plain.read_text() != "", 30, "the plain child's report")
    assert plain.read_text() == str(os.sched_getscheduler(0))


def test_an_unknown_cpu_policy_is_refused() -> None:
    with pytest.raises(AssertionError, match="cpu_policy"):
        ChildSpec("x", SLEEPER, cpu_policy="realtime")
