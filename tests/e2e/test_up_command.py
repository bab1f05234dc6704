"""`inferplane up` as a user runs it: ready banner, a working key and curl, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from inferplane.cli.launcher import read_env
from tests.e2e.procs import alive, descendants

pytestmark = pytest.mark.e2e


def sched_policy(pid: int) -> int | None:
    """A live process's scheduling policy (None: it is gone)."""
    try:
        return os.sched_getscheduler(pid) if alive(pid) else None
    except ProcessLookupError:
        return None


def test_up_prints_a_working_key_and_stops_every_child_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "inferplane.cli", "up", "--state-dir", str(tmp_path),
                             "--free-ports", "--ready-timeout", "300"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 320
        for line in proc.stdout:
            out.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
            assert time.monotonic() < deadline, "".join(out)
        banner = "".join(out)
        assert "inferplane is ready" in banner, banner
        assert "waiting for executor" in banner or "executor ready" in banner
        env = read_env(tmp_path / "local.env")
        assert env["INFERPLANE_API_KEY"] in banner
        assert oct((tmp_path / "local.env").stat().st_mode & 0o777) == "0o600"

        # The printed curl works as printed (run it through a shell).
        curl = re.search(r"^  (curl .*?)\n\n", banner, re.S | re.M)
        assert curl, banner
        result = subprocess.run(["bash", "-c", curl.group(1).replace("\\\n", " ")], capture_output=True, text=True,
                                timeout=60)
        assert '"chat.completion"' in result.stdout, result.stdout + result.stderr

        # The dashboard link signs in (a cookie) and redirects to a URL without its token, which is no API key.
        link = env["INFERPLANE_DASHBOARD_URL"]
        assert link in banner and env["INFERPLANE_API_KEY"] not in link and env["INFERPLANE_ADMIN_KEY"] not in link
        signed = httpx.get(link, timeout=10)
        assert signed.status_code == 303 and signed.headers["location"] == "/dashboard/", signed.text
        assert "HttpOnly" in signed.headers["set-cookie"]

        models = httpx.get(f"{env['INFERPLANE_BASE_URL']}/models",
                           headers={"Authorization": f"Bearer {env['INFERPLANE_API_KEY']}"}, timeout=10)
        assert models.status_code == 200

        # The default token path: the executor's generations reach Triton on the step path (one stream per model,
        # one response per model step), which the model counts as "channel" responses (published about once a s).
        triton_metrics = yaml.safe_load((tmp_path / "stack.yaml").read_text())["executor"]["triton"]["metrics_port"]
        deadline = time.monotonic() + 30
        while True:
            scraped = httpx.get(f"http://127.0.0.1:{triton_metrics}/metrics", timeout=10).text
            channel = re.search(r'^inferplane_llm_responses_total\{[^}]*mode="channel"[^}]*\} (\S+)$', scraped, re.M)
            if (channel and float(channel.group(1)) > 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert channel and float(channel.group(1)) > 0, [line for line in scraped.splitlines() if "responses" in line]

        # Precise cache-aware routing: the model's prefix cache reports its blocks through the executor to the
        # router (a snapshot when the model's step channel attached, then the blocks a long prompt stored).
        long = httpx.post(f"{env['INFERPLANE_BASE_URL']}/completions",
                          headers={"Authorization": f"Bearer {env['INFERPLANE_API_KEY']}"},
                          json={"model": "tiny-llama", "prompt": "Return the path of a file joined with a name. " * 8,
                                "max_tokens": 2}, timeout=60)
        assert long.status_code == 200 and long.json()["usage"]["prompt_tokens"] > 32, long.text
        router = yaml.safe_load((tmp_path / "stack.yaml").read_text())["router"]["server"]
        reports: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while not (reports.get("snapshot") and reports.get("change")) and time.monotonic() < deadline:
            scraped = httpx.get(f"http://{router['host']}:{router['metrics_port']}/metrics", timeout=10).text
            reports = {k: float(v) for k, v in re.findall(
                r'^inferplane_router_channel_block_reports_total\{kind="(\w+)"\} (\S+)$', scraped, re.M)}
            time.sleep(0.2)
        assert reports.get("snapshot", 0) >= 1 and reports.get("change", 0) >= 1, reports

        # Default sampling keeps the trace of every failed request: `inferplane trace` finds this one.
        refused = httpx.post(f"{env['INFERPLANE_BASE_URL']}/chat/completions",
                             headers={"Authorization": f"Bearer {env['INFERPLANE_API_KEY']}",
                                      "x-request-id": "up-test-refused"},
                             json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
                             timeout=30)
        assert refused.status_code == 404
        deadline = time.monotonic() + 30
        while True:
            shown = subprocess.run([sys.executable, "-m", "inferplane.cli", "trace", "up-test-refused", "--file",
                                    str(tmp_path / "traces.jsonl")], capture_output=True, text=True, timeout=60)
            if shown.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert shown.returncode == 0 and "router" in shown.stdout, shown.stdout + shown.stderr

        children = descendants(proc.pid)
        names = {Path(f"/proc/{p}/exe").resolve().name for p in children if alive(p)}
        assert "tritonserver" in names, names
        # The default CPU policy: every process of the stack (Envoy, Triton and its stubs included) runs under
        # SCHED_BATCH; the launcher itself keeps its own.
        policies = {p: policy for p in children if (policy := sched_policy(p)) is not None}
        assert len(policies) >= 5 and set(policies.values()) == {os.SCHED_BATCH}, policies
        assert os.sched_getscheduler(proc.pid) == os.sched_getscheduler(0)
    finally:
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in children if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left behind after Ctrl-C: {left}"
