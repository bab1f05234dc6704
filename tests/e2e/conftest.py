"""The whole local stack, started once for the e2e tests, exactly as `inferplane up` starts it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inferplane.cli.launcher import LocalStack, StackConfig


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("stack")
    # Prompts are encoded by the tokenizer service here (the router's default is in process, which the fault
    # and ledger stacks and `inferplane up` run), so both paths run end to end and every service is traced;
    # every request is traced whole (the default exports 1 % of them, and the failed and slow ones).
    cfg = StackConfig(state_dir=state, ports=dict.fromkeys(StackConfig().ports, 0), ready_timeout_s=300,
                      router={"tokenize": "remote"}, trace_sample_ratio=1.0)
    lines: list[str] = []
    local = LocalStack(cfg, log=lines.append)
    try:
        local.start()
    except Exception:
        local.stop()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state / "logs").glob("*.log")))
        raise RuntimeError(f"stack did not start:\n{chr(10).join(lines)}\n{logs}") from None
    key = local.create_demo_key()
    local.write_env(key)
    local.api_key = key  # type: ignore[attr-defined]
    yield local
    local.stop()


@pytest.fixture(scope="session")
def api_key(stack: LocalStack) -> str:
    return stack.api_key  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="session")
def state_dir(stack: LocalStack) -> Path:
    return stack.state
