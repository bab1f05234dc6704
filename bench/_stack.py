"""One way for the benchmarks to get a local stack: a running one (``--state-dir``) or a fresh one on free ports."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.launcher import LocalStack, StackConfig


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def local_stack(state_dir: Path | None = None, **config: Any) -> Iterator[Path]:
    """Yield the state directory of a running stack (its ``stack.yaml`` and ``local.env`` with a demo key).

    With ``state_dir`` the stack is one already running there (started by ``inferplane up --state-dir``);
    without, a stack is started on free ports in a temporary directory (``config``: more ``StackConfig`` fields)
    and stopped at the end.
    """
    if state_dir is not None:
        yield state_dir
        return
    state = Path(tempfile.mkdtemp(prefix="inferplane-bench-"))
    config.setdefault("trace_exporter", "none")
    stack = LocalStack(StackConfig(state_dir=state, ports=dict.fromkeys(StackConfig().ports, 0), **config),
                       log=progress)
    progress("starting the local stack ...")
    try:
        stack.start()
        stack.write_env(stack.create_demo_key())
        yield state
    finally:
        stack.stop()
