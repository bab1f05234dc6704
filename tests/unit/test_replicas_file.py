"""A router's replica set that follows a file of executor addresses (``file:///path``, what ``inferplane up
--autoscale`` writes): new lines become replicas, a line that goes away retires its replica (no new request at
once, closed only when the requests it holds have ended)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from inferplane.router.replicas import ReplicaSet, read_addresses


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def write(path: Path, *lines: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)  # as the launcher writes it: never half a file


def test_read_addresses_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "executors"
    path.write_text("# executors\n127.0.0.1:1\n\n  127.0.0.1:2  # the second\n")
    assert read_addresses(str(path)) == {"127.0.0.1:1", "127.0.0.1:2"}
    assert read_addresses(str(tmp_path / "missing")) is None


async def test_file_targets_add_retire_and_bring_back_replicas(tmp_path: Path) -> None:
    path = tmp_path / "executors"
    write(path, "127.0.0.1:1")
    # real channels to closed ports: their health streams fail and retry, which is all this needs
    rs = ReplicaSet(["127.0.0.1:9", f"file://{path}"], channel_factory=grpc.aio.insecure_channel,
                    file_interval_s=0.05, retire_timeout_s=30.0)
    await rs.start()
    try:
        assert set(rs.replicas) == {"127.0.0.1:9", "127.0.0.1:1"}  # the file is read before start returns

        write(path, "127.0.0.1:1", "127.0.0.1:2")
        await until(lambda: "127.0.0.1:2" in rs.replicas)

        busy = rs.replicas["127.0.0.1:2"]
        busy.outstanding = 1  # a stream in flight there
        write(path, "127.0.0.1:1")
        await until(lambda: busy.retiring)
        busy.serving = True  # (its health stream to a closed port says otherwise: as if it served)
        assert not busy.available(time.monotonic())  # no new request from now on
        await asyncio.sleep(0.3)
        assert rs.replicas.get("127.0.0.1:2") is busy  # ... but not closed under its stream

        write(path, "127.0.0.1:1", "127.0.0.1:2")  # back before its retirement ended: the same replica
        await until(lambda: not busy.retiring)
        busy.serving = True
        assert rs.replicas["127.0.0.1:2"] is busy and busy.available(time.monotonic())

        write(path, "127.0.0.1:1")
        await until(lambda: busy.retiring)
        busy.outstanding = 0  # the stream ends
        await until(lambda: "127.0.0.1:2" not in rs.replicas)
        assert set(rs.replicas) == {"127.0.0.1:9", "127.0.0.1:1"}  # the static target stays

        path.unlink()  # an unreadable file keeps what it named
        await asyncio.sleep(0.2)
        assert set(rs.replicas) == {"127.0.0.1:9", "127.0.0.1:1"}
    finally:
        await rs.close()


async def test_a_retiring_replica_is_closed_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "executors"
    write(path, "127.0.0.1:3")
    rs = ReplicaSet([f"file://{path}"], channel_factory=grpc.aio.insecure_channel, file_interval_s=0.05,
                    retire_timeout_s=0.3)
    await rs.start()
    try:
        rs.replicas["127.0.0.1:3"].outstanding = 1  # never ends
        write(path)
        await until(lambda: not rs.replicas)
    finally:
        await rs.close()
