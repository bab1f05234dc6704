"""End to end against the stack ``inferplane up`` starts: a canary. ``canary-llama`` has versions 1 and 2 (both
served by the shipped tiny-llama) and a 90/10 split from its creation; 400 chat completions from 400 distinct
users are stamped (usage records' ``model_version``) within ±5 points of 90/10; ``/promote`` version 2 → the next
400 are all version 2. The router and the tokenizer service pick each change up by polling metering's catalog."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from inferplane.cli.launcher import LocalStack
from inferplane.metering.secret import load_secret
from inferplane.metering.store import MeteringStore
from inferplane.router.canary import choose_version

pytestmark = pytest.mark.e2e
MODEL = "canary-llama"
REQUESTS = 400
PICKUP_S = 10.0  # the poll period (2 s) with room for a loaded machine


def wait_for(check: Callable[[], bool], within_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within_s, f"{what}: not within {within_s}s"
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_90_10_canary_splits_400_users_and_promote_moves_them_all(stack: LocalStack, api_key: str) -> None:
    root = stack.base_url.removesuffix("/v1")
    admin = {"authorization": f"Bearer {stack.create_admin_key()}"}
    user = {"authorization": f"Bearer {api_key}"}
    http = httpx.Client(base_url=root, timeout=60, limits=httpx.Limits(max_connections=16))
    store = MeteringStore(f"sqlite:///{stack.state / 'metering.db'}",
                          load_secret(secret=None, secret_file=stack.state / "metering-secret"))

    def ask(u: str, rid: str) -> None:
        r = http.post("/v1/chat/completions", headers={**user, "x-request-id": rid}, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "user": u})
        assert r.status_code == 200, r.text

    def stamped(prefix: str, count: int) -> dict[str, int]:
        def rows() -> dict[str, int]:
            return {r.request_id: r.model_version for r in store.list_usage(limit=1000)
                    if r.request_id.startswith(prefix)}

        wait_for(lambda: len(rows()) == count, 30, f"{count} usage records {prefix}*")
        return rows()

    def run(phase: str) -> tuple[dict[str, int], float]:
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: ask(f"{phase}-user-{i}", f"{phase}-{i}"), range(REQUESTS)))
        return stamped(f"{phase}-", REQUESTS), time.monotonic() - start

    try:
        made = http.post("/admin/models", headers=admin, json={
            "id": MODEL, "versions": {"1": "tiny-llama", "2": "tiny-llama"}, "version": 1,
            "traffic": {"1": 90, "2": 10}})
        assert made.status_code == 201, made.text
        assert made.json()["traffic"] == {"1": 90, "2": 10}

        def served() -> bool:  # the router and the tokenizer service poll on their own: both must know it
            r = http.post("/v1/chat/completions", headers=user, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
            return r.status_code == 200

        wait_for(served, PICKUP_S, "served")  # created with its split: served means split
        split, took = run("canary")
        shares = Counter(split.values())
        canary_pct = 100 * shares[2] / REQUESTS
        assert set(shares) <= {1, 2} and abs(canary_pct - 10) <= 5, shares
        # each user's version is the one the choice function gives that user (no stray request)
        assert all(v == choose_version({1: 90, 2: 10}, MODEL, f"canary-user-{rid.split('-')[1]}")
                   for rid, v in split.items())

        promoted = http.post(f"/admin/models/{MODEL}/promote", headers=admin, json={"version": 2})
        assert promoted.status_code == 200, promoted.text
        assert (promoted.json()["version"], promoted.json()["traffic"]) == (2, {"2": 100})
        # the router took the promote when a user the split kept on version 1 is served by version 2
        probe = next(f"canary-user-{i}" for i in range(REQUESTS) if split[f"canary-{i}"] == 1)
        tries = iter(range(1000))

        def probe_on_2() -> bool:
            rid = f"probe-{next(tries)}"
            ask(probe, rid)
            wait_for(lambda: any(r.request_id == rid for r in store.list_usage(limit=50)), 30, "probe record")
            return next(r.model_version for r in store.list_usage(limit=50) if r.request_id == rid) == 2

        picked = wait_for(probe_on_2, PICKUP_S + 10, "promote picked up")
        after, took_after = run("promoted")
        assert Counter(after.values()) == Counter({2: REQUESTS}), Counter(after.values())
        print(f"canary 90/10 over {REQUESTS} users: version 1 {shares[1]} ({100 - canary_pct:.1f} %), version 2 "
              f"{shares[2]} ({canary_pct:.1f} %) in {took:.1f}s; promote picked up within {picked:.1f}s; "
              f"after promote: version 2 {REQUESTS}/{REQUESTS} in {took_after:.1f}s")
    finally:
        http.delete(f"/admin/models/{MODEL}", headers=admin)
        store.close()
        http.close()
