"""What a usage record's durable write costs the request: the outbox's ``put`` with SQLite's ``synchronous``
FULL (an fsync per commit, the old setting) against NORMAL (the WAL commit; a group fsync at most a second later).

    python -m bench.outbox_put [--puts 400] [--rounds 2]

Prints sequential put p50/p99 and the time of as many concurrent puts, alternating the two settings.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from inferplane.router.outbox import UsageOutbox
from inferplane.v1 import metering_pb2


async def _never(records: list[metering_pb2.UsageRecord]) -> None:
    raise ConnectionError("no metering in this benchmark")


async def run(mode: str, puts: int) -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the working directory's disk, not a tmpfs
        box = UsageOutbox(Path(tmp) / "outbox.db", _never)
        box._db.execute(f"PRAGMA synchronous={mode}")  # the setting under test (the outbox sets NORMAL)
        latencies = []
        for i in range(puts):
            started = time.perf_counter()
            await box.put(metering_pb2.UsageRecord(request_id=f"s{i}", key_id="k" * 12, model="m"))
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(box.put(metering_pb2.UsageRecord(request_id=f"c{i}")) for i in range(puts)))
        together = time.perf_counter() - started
        await box.stop(drain_timeout_s=0)
    latencies.sort()
    print(f"synchronous={mode:6s} sequential put p50 {statistics.median(latencies) * 1e3:.3f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.3f} ms; {puts} concurrent puts {together * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for mode in ("FULL", "NORMAL"):
            asyncio.run(run(mode, args.puts))


if __name__ == "__main__":
    main()
