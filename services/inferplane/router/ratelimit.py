"""Rate limits per key: requests and tokens per minute, checked before any work, with GCRA.

GCRA (the generic cell rate algorithm) keeps one number per key and dimension, the theoretical arrival time
(TAT). With a limit of L per period P each unit of cost advances the TAT by T = P / L; a request of cost n
conforms when ``max(TAT, now) + n*T - P <= now``. A full burst of L is allowed from idle, and the bucket then
refills smoothly (L/P per second), so N requests spread over a minute and N at once are treated alike.

Both dimensions are decided together: a request is admitted only when it conforms on both, and only then
are both advanced. ``LocalRateLimiter`` does it in this process; ``RedisRateLimiter`` does it in one Lua
script on Redis (atomic, Redis's own clock), so several routers sharing Redis admit the limit together, not
N times it. When Redis cannot be reached the Redis limiter falls back to the local one (the default,
``on_error="local"``: each router then enforces the full limit by itself, at most N times the limit in all
while Redis is down, and never unlimited), or admits (``"open"``), or refuses (``"closed"``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import Counter

from inferplane.common.errors import Unavailable

log = logging.getLogger(__name__)

PERIOD_S = 60.0
REDIS_FALLBACKS = Counter("inferplane_router_ratelimit_redis_errors", "Rate-limit checks that Redis could not "
                          "answer, by what was done instead (local/open/closed)", ["fallback"])


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute limits of one key; None: that dimension is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            assert value is None or value >= 1, f"{name} must be >= 1 or None (got {value})"

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


@dataclass(frozen=True, slots=True)
class Decision:
    """A check's result and the state to report (OpenAI's ``x-ratelimit-*`` headers)."""

    allowed: bool
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    # Refused: seconds until the same request would conform; None when it never can (tokens > the limit).
    retry_after_s: float | None = None
    # Refused: "requests" or "tokens".
    exceeded: str | None = None

    def headers(self) -> tuple[tuple[str, str], ...]:
        """The ``x-ratelimit-*`` (and, when refused, ``retry-after``) metadata to send."""
        out: list[tuple[str, str]] = []
        for dim in ("requests", "tokens"):
            limit = getattr(self, f"limit_{dim}")
            if limit is None:
                continue
            out += [(f"x-ratelimit-limit-{dim}", str(limit)),
                    (f"x-ratelimit-remaining-{dim}", str(getattr(self, f"remaining_{dim}"))),
                    (f"x-ratelimit-reset-{dim}", format_reset(getattr(self, f"reset_{dim}_s") or 0.0))]
        if not self.allowed and self.retry_after_s is not None:
            out += [("retry-after", str(max(1, math.ceil(self.retry_after_s)))),
                    ("retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000))))]
        return tuple(out)


ALLOW_ALL = Decision(True)


def format_reset(seconds: float) -> str:
    """OpenAI's reset spelling: ``"120ms"``, ``"1.5s"``, ``"6m0s"``."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimiter(Protocol):
    async def check(self, key_id: str, *, requests: int, tokens: int, limits: Limits) -> Decision:
        """Admit (and count) ``requests`` and ``tokens`` for ``key_id``, or refuse (and count nothing). A negative
        cost gives back what an earlier check of the same request counted (a fallback's tokens replacing the first
        model's): it always conforms, and gives back no more than the bucket's full burst."""
        ...


# ---- GCRA, in Python -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Dim:
    conforms: bool
    new_tat: float
    # If admitted (the state after) and if not (the state as it is).
    remaining: tuple[int, int]
    reset_s: tuple[float, float]
    retry_after_s: float | None


def _gcra(tat: float, now: float, limit: int, cost: int) -> _Dim:
    interval = PERIOD_S / limit
    base = max(tat, now)
    new_tat = base + cost * interval
    allow_at = new_tat - PERIOD_S
    remaining = (_remaining(new_tat, now, interval), _remaining(base, now, interval))
    reset = (max(new_tat - now, 0.0), base - now)
    if cost > limit:  # can never conform
        return _Dim(False, tat, remaining, reset, None)
    if allow_at > now + 1e-9:
        return _Dim(False, tat, remaining, reset, allow_at - now)
    return _Dim(True, new_tat, remaining, reset, None)


def _remaining(tat: float, now: float, interval: float) -> int:
    # a TAT before now (a refund past the bucket's refill) is a full bucket, never more
    return max(0, math.floor((PERIOD_S - max(tat - now, 0.0)) / interval + 1e-9))


def decide(state: tuple[float, float], now: float, *, requests: int, tokens: int,
           limits: Limits) -> tuple[Decision, tuple[float, float]]:
    """Both dimensions at once: ``(decision, new state)``; the state moves only when admitted."""
    req_tat, tok_tat = state
    r = _gcra(req_tat, now, limits.requests_per_minute, requests) if limits.requests_per_minute else None
    t = _gcra(tok_tat, now, limits.tokens_per_minute, tokens) if limits.tokens_per_minute else None
    allowed = (r is None or r.conforms) and (t is None or t.conforms)
    exceeded = None if allowed else ("requests" if r is not None and not r.conforms else "tokens")
    retry = None
    if not allowed:
        waits = [d.retry_after_s for d in (r, t) if d is not None and not d.conforms]
        retry = None if any(w is None for w in waits) else max(w for w in waits if w is not None)
    i = 0 if allowed else 1  # a refusal reports the state as it stays
    decision = Decision(
        allowed, limits.requests_per_minute, r.remaining[i] if r else None, r.reset_s[i] if r else None,
        limits.tokens_per_minute, t.remaining[i] if t else None, t.reset_s[i] if t else None, retry, exceeded)
    if not allowed:
        return decision, state
    return decision, (r.new_tat if r else req_tat, t.new_tat if t else tok_tat)


class LocalRateLimiter:
    """GCRA in this process (the default with one router). Idle keys are forgotten (LRU beyond ``max_keys``;
    a key whose TAT has passed is the same as a key never seen)."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] | None = None) -> None:
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_keys
        self._clock = clock or time.monotonic

    async def check(self, key_id: str, *, requests: int, tokens: int, limits: Limits) -> Decision:
        return self.check_now(key_id, requests=requests, tokens=tokens, limits=limits)

    def check_now(self, key_id: str, *, requests: int, tokens: int, limits: Limits) -> Decision:
        if limits.unlimited:
            return ALLOW_ALL
        now = self._clock()
        decision, state = decide(self._state.get(key_id, (0.0, 0.0)), now, requests=requests, tokens=tokens,
                                 limits=limits)
        self._state[key_id] = state
        self._state.move_to_end(key_id)
        while len(self._state) > self._max:
            self._state.popitem(last=False)
        return decision


# ---- GCRA, in Redis --------------------------------------------------------------------------------------

# KEYS[1]: the key's state hash (fields r, t: TATs in seconds on Redis's clock).
# ARGV: requests_per_minute, tokens_per_minute (0: unlimited), requests, tokens.
# Returns {allowed, r_remaining, r_reset_ms, t_remaining, t_reset_ms, retry_after_ms, exceeded (1: requests,
# 2: tokens)} as integers (Lua numbers reach the client truncated to integers); -1: not applicable.
GCRA_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local period = 60.0
local function dim(field, limit, cost)
  if limit <= 0 then return nil end
  local interval = period / limit
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  local base = math.max(tat, now)
  local new_tat = base + cost * interval
  local allow_at = new_tat - period
  local d = {new = new_tat, base = base, interval = interval}
  if cost > limit then
    d.ok = false; d.retry = -1
  elseif allow_at > now + 1e-9 then
    d.ok = false; d.retry = allow_at - now
  else
    d.ok = true
  end
  return d
end
local function report(d, admitted)
  local tat = d.base
  if admitted then tat = d.new end
  d.remaining = math.max(0, math.floor((period - math.max(tat - now, 0)) / d.interval + 1e-9))
  d.reset = math.max(tat - now, 0)
end
local r = dim('r', tonumber(ARGV[1]), tonumber(ARGV[3]))
local t = dim('t', tonumber(ARGV[2]), tonumber(ARGV[4]))
local allowed = (r == nil or r.ok) and (t == nil or t.ok)
if r ~= nil then report(r, allowed) end
if t ~= nil then report(t, allowed) end
local retry = -1
if not allowed then
  local never = false
  for _, d in ipairs({r or {ok = true}, t or {ok = true}}) do
    if not d.ok then
      if d.retry < 0 then never = true elseif d.retry > retry then retry = d.retry end
    end
  end
  if never then retry = -1 end
else
  local ttl = 0
  if r ~= nil then redis.call('HSET', KEYS[1], 'r', string.format('%.6f', r.new)); ttl = math.max(ttl, r.new - now) end
  if t ~= nil then redis.call('HSET', KEYS[1], 't', string.format('%.6f', t.new)); ttl = math.max(ttl, t.new - now) end
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
end
local exceeded = 0
if not allowed then
  if r ~= nil and not r.ok then exceeded = 1 else exceeded = 2 end
end
local function ms(x) if x < 0 then return -1 end return math.ceil(x * 1000) end
return {allowed and 1 or 0, r and r.remaining or -1, r and ms(r.reset) or -1, t and t.remaining or -1,
        t and ms(t.reset) or -1, ms(retry), exceeded}
"""

OnError = Literal["local", "open", "closed"]


class RedisRateLimiter:
    """GCRA in Redis for several routers. The script is loaded once (EVALSHA after the first call)."""

    def __init__(self, url: str, *, prefix: str = "inferplane:rl:", on_error: OnError = "local",
                 timeout_s: float = 1.0, retry_after_error_s: float = 1.0, max_connections: int = 32,
                 pool_timeout_s: float = 2.0) -> None:
        import redis.asyncio as aioredis  # imported here: routers without Redis never need the package

        # A bounded pool that makes a burst of checks queue for a connection (a plain pool refuses past its size).
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout_s,
                                                        socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(GCRA_LUA)
        self._prefix = prefix
        self._on_error = on_error
        self._local = LocalRateLimiter()
        self._cooldown_s = retry_after_error_s
        self._down_until = 0.0

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def check(self, key_id: str, *, requests: int, tokens: int, limits: Limits) -> Decision:
        if limits.unlimited:
            return ALLOW_ALL
        if time.monotonic() < self._down_until:
            return self._fallback(key_id, requests=requests, tokens=tokens, limits=limits)
        try:
            reply = await self._script(keys=[self._prefix + key_id], args=[
                limits.requests_per_minute or 0, limits.tokens_per_minute or 0, requests, tokens])
        except Exception as exc:  # connection refused, timeout, a Redis that lost its mind: never the caller's fault
            log.warning("rate limiting through Redis failed (%s); %s for %.1fs", type(exc).__name__,
                        self._on_error, self._cooldown_s)
            self._down_until = time.monotonic() + self._cooldown_s
            return self._fallback(key_id, requests=requests, tokens=tokens, limits=limits)
        allowed, r_left, r_reset, t_left, t_reset, retry, which = (int(v) for v in reply)

        def opt(value: int, scale: float = 1.0) -> float | None:
            return None if value < 0 else value * scale

        exceeded = {1: "requests", 2: "tokens"}.get(which)
        return Decision(bool(allowed), limits.requests_per_minute,
                        None if r_left < 0 else r_left, opt(r_reset, 1e-3), limits.tokens_per_minute,
                        None if t_left < 0 else t_left, opt(t_reset, 1e-3),
                        None if allowed else opt(retry, 1e-3), exceeded)

    def _fallback(self, key_id: str, *, requests: int, tokens: int, limits: Limits) -> Decision:
        REDIS_FALLBACKS.labels(self._on_error).inc()
        if self._on_error == "open":
            return ALLOW_ALL
        if self._on_error == "closed":
            raise Unavailable("Rate limits cannot be checked right now. Please retry.")
        return self._local.check_now(key_id, requests=requests, tokens=tokens, limits=limits)
