"""tritonserver runs on jemalloc (or tcmalloc) when one is installed, as Triton's release notes advise against
glibc's arenas holding freed memory in a long-running server (the soak, bench/soak.py, checks RSS over time)."""

from __future__ import annotations

from pathlib import Path

from inferplane.cli.launcher import LocalStack
from inferplane.executor.triton_process import allocator_preload
from tests.faults.test_faults import triton_pid


def test_tritonserver_uses_the_preferred_allocator(stack: LocalStack) -> None:
    pid = triton_pid(stack, "executor")
    maps = Path(f"/proc/{pid}/maps").read_text()
    preload = allocator_preload("auto")
    if preload is None:  # none installed: glibc's malloc, and the executor said so in its log
        assert "jemalloc" not in maps and "tcmalloc" not in maps
        assert "allocator: system malloc" in (stack.state / "logs" / "executor.log").read_text()
    else:
        assert preload.split(".so")[0] in maps, f"{preload} is not mapped into tritonserver"


def test_allocator_choice() -> None:
    assert allocator_preload("system") is None
    assert allocator_preload("/opt/lib/libtcmalloc.so.4") == "/opt/lib/libtcmalloc.so.4"
