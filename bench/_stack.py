"""One way for the benchmarks to get a local stack: a running one (``--state-dir``) or a fresh one on free ports."""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from inferplane.assets import CATALOG
from inferplane.cli.launcher import LocalStack, StackConfig
from inferplane.common.catalog import PACKAGE_PREFIX


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
    # a benchmark stopped with SIGTERM (kill, timeout) stops its stack too, instead of leaving it running
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        stack.start()
        stack.write_env(stack.create_demo_key())
        yield state
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def catalog_with(changes: dict[str, dict[str, Any]], base: Path = CATALOG) -> Path:
    """A copy of the catalog ``base`` with fields of some models changed (``{model id: {field: value}}``), written
    to a temporary file; its relative paths are made absolute so that they still point where they did."""
    data = yaml.safe_load(base.read_text())
    for model in data["models"]:
        for name in ("checkpoint", "tokenizer", "triton_template"):
            value = model.get(name)
            if value and not str(value).startswith(PACKAGE_PREFIX) and not Path(value).is_absolute():
                model[name] = str((base.parent / value).resolve())
        model.update(changes.get(model["id"], {}))
    unknown = set(changes) - {m["id"] for m in data["models"]}
    if unknown:
        raise ValueError(f"not in the catalog: {sorted(unknown)}")
    out = Path(tempfile.mkdtemp(prefix="inferplane-catalog-")) / "catalog.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out
