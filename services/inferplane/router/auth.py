"""API key authentication: metadata → metering's VerifyKey, with a short-lived cache of good keys."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import grpc
from prometheus_client import Counter

from inferplane.common.errors import Unauthenticated
from inferplane.common.wire import INCORRECT_KEY
from inferplane.router.clients import KeyInfo, MeteringClient

# metering faults (not verdicts on the key) during which a recently verified key keeps working
STALE_IF = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
STALE_HITS = Counter("inferplane_router_key_stale_hits", "Keys accepted from the cache while metering was down")


class KeyVerifier:
    """Verifies keys with metering; caches successes for ``ttl`` seconds (never failures).

    The cache is keyed by a SHA-256 of the key so the raw key is not kept in memory longer than needed.
    Revocation (and a change of limits or budgets) therefore takes effect within ``ttl`` seconds; expiry takes
    effect at once.

    When metering cannot be reached, a key verified within the last ``stale_ttl`` seconds keeps working
    (stale-if-error): inference continues through a metering outage for callers already seen, while usage waits
    in the router's outbox. A key never seen (or seen longer ago) is refused with UNAVAILABLE: nothing is
    admitted unverified. Budgets still fail closed (admission reserves in metering).
    """

    def __init__(self, metering: MeteringClient, *, ttl: float = 30.0, stale_ttl: float = 600.0,
                 max_entries: int = 10_000, timeout: float = 5.0) -> None:
        self._metering = metering
        self._ttl = ttl
        self._stale_ttl = max(stale_ttl, ttl)
        self._max = max_entries
        self._timeout = timeout
        # digest -> (fresh until, usable-if-metering-is-down until, key)
        self._cache: OrderedDict[bytes, tuple[float, float, KeyInfo]] = OrderedDict()

    async def verify(self, api_key: str) -> KeyInfo:
        digest = hashlib.sha256(api_key.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[2].expires_at is not None and hit[2].expires_at <= time.time():
            self._cache.pop(digest, None)  # expired while cached: it stops working now, not at the TTL
            raise Unauthenticated(INCORRECT_KEY)
        if hit is not None and hit[0] > now:
            return hit[2]
        try:
            info = await self._metering.verify_key(api_key, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._cache.pop(digest, None)
                raise Unauthenticated(INCORRECT_KEY) from None
            if hit is not None and hit[1] > now and exc.code() in STALE_IF:
                STALE_HITS.inc()
                return hit[2]
            raise
        self._cache[digest] = (now + self._ttl, now + self._stale_ttl, info)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return info
