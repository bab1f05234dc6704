"""A local stack with two executor replicas (each its own Triton) for the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inferplane.cli.launcher import LocalStack, StackConfig

# The router's deadline for one request: short, so a hung executor answers 504 within the test.
REQUEST_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def stack2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("faults")
    cfg = StackConfig(state_dir=state, ports=dict.fromkeys(StackConfig().ports, 0), ready_timeout_s=300,
                      executors=2, trace_exporter="none",
                      router={"request_timeout_s": REQUEST_TIMEOUT_S, "eject_base_s": 0.5, "eject_max_s": 2.0},
                      restart=None)  # these tests kill and restart services themselves (`up`'s restarts: e2e)
    local = LocalStack(cfg, log=lambda m: None)
    try:
        local.start()
    except Exception:
        local.stop()
        raise
    local.api_key = local.create_demo_key()  # type: ignore[attr-defined]
    yield local
    local.stop()
