"""A fault drill against a running ``inferplane up --executors 2``: 32 streaming OpenAI-SDK clients, then SIGKILL
of one executor process (``executor_2``) or of its tritonserver (``triton_2``); counts what the clients saw and
how long the executor took to answer SERVING again.

    inferplane up --executors 2 &          # in DIR
    python -m bench.kill_under_load DIR/.inferplane executor_2 [--executor-addr 127.0.0.1:50063]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import time
from pathlib import Path

import grpc
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc


def find(pattern: str) -> int | None:
    """The pid of the first process whose command line matches ``pattern``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if re.search(pattern, cmd):
                return int(entry.name)
    return None


def serving(addr: str) -> bool:
    try:
        with grpc.insecure_channel(addr) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def wait_for(addr: str, state: bool, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while serving(addr) != state:
        assert time.monotonic() < deadline, f"{addr} not {'SERVING' if state else 'down'} after {timeout}s"
        time.sleep(0.05)


async def drill(state: Path, target: str, addr: str, streams: int) -> None:
    env = dict(line.split("=", 1) for line in (state / "local.env").read_text().split())
    client = openai.AsyncOpenAI(base_url=env["INFERPLANE_BASE_URL"], api_key=env["INFERPLANE_API_KEY"], max_retries=0)
    stats = {"ok": 0, "failed_before_first_token": 0, "failed_after_first_token": 0}
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            started = False
            try:
                stream = await client.chat.completions.create(
                    model="tiny-llama", stream=True, max_tokens=48,
                    messages=[{"role": "user", "content": "What does os.path.join do?"}])
                async for chunk in stream:
                    started = started or bool(chunk.choices and chunk.choices[0].delta.content)
                stats["ok"] += 1
            except openai.OpenAIError as exc:
                stats["failed_after_first_token" if started else "failed_before_first_token"] += 1
                if not started:
                    print("lost before its first token:", repr(exc)[:200])

    tasks = [asyncio.create_task(worker()) for _ in range(streams)]
    await asyncio.sleep(8)
    pattern = r"--section executor_2$" if target == "executor_2" else r"tritonserver .*executor_2/"
    pid = find(pattern)
    assert pid is not None, f"no process matches {pattern!r}"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    print(f"SIGKILL {target} (pid {pid}) under {streams} streams")
    await asyncio.to_thread(wait_for, addr, False)  # the health check sees it gone, then back
    await asyncio.to_thread(wait_for, addr, True)
    back = time.monotonic() - killed
    await asyncio.sleep(5)
    stop.set()
    await asyncio.gather(*tasks)
    print(f"{target}: executor SERVING again {back:.1f}s after the SIGKILL; clients: {stats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("target", choices=["executor_2", "triton_2"])
    parser.add_argument("--executor-addr", default="127.0.0.1:50063", help="executor_2's gRPC address")
    parser.add_argument("--streams", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(drill(args.state_dir, args.target, args.executor_addr, args.streams))


if __name__ == "__main__":
    main()
