"""The usage dashboard: a page at ``/dashboard/``, the JSON it polls at ``/dashboard/api/summary``, its static files.

Who sees what is metering's rule, as for ``/v1/usage``: every call carries the caller's key, an admin key reads
every key's usage, any other key its own. A caller is known by ``Authorization: Bearer KEY`` or by a session
cookie (HttpOnly, SameSite=Strict), which one of two logins opens:

- ``GET /dashboard/login?token=T``: the link ``inferplane up`` prints. ``T`` is a random login token made for
  this run, never an API key. The launcher writes the link and the stack's admin key to its credentials file
  (``.inferplane/local.env``, 0600: the one file that holds keys), which the gateway reads as
  ``dashboard_credentials_file`` at each link sign-in; the next ``inferplane up`` makes a new token. The answer
  sets the cookie and redirects to ``/dashboard/``, a URL without the token. Neither access log writes query
  strings (Envoy's format drops them, the gateway keeps no access log), spans carry the path only, and Envoy never
  samples a trace of the sign-in route.
- ``POST /dashboard/login`` with a form field ``api_key``: a key's holder, checked with metering's ``WhoAmI``.

Sessions live in this process's memory: a restart of the gateway signs everyone out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY, generate_latest

from inferplane.common import wire
from inferplane.gateway.dashboard_data import keys_section, latency_section, recent_section, usage_section
from inferplane.gateway.errors import GatewayError, from_rpc_error, unauthenticated
from inferplane.v1 import metering_pb2, metering_pb2_grpc

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"charts.js": "text/javascript", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}
COOKIE = "inferplane_dashboard"
COOKIE_PATH = "/dashboard"
MAX_SESSIONS = 1000
DAYS = 14  # the usage window the page shows
RECENT = 25  # recent requests listed
NOT_SIGNED_IN = "Sign in: open the link `inferplane up` printed, or send your API key."


# The credentials file's variables (``inferplane up`` writes them): the sign-in link and the key it acts with.
DASHBOARD_URL_VAR = "INFERPLANE_DASHBOARD_URL"
ADMIN_KEY_VAR = "INFERPLANE_ADMIN_KEY"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def dashboard_url(base: str, token: str) -> str:
    """The sign-in link (``base``: the edge's ``http://host:port``)."""
    return f"{base}/dashboard/login?{urlencode({'token': token})}"


class Sessions:
    """Session id → API key, in memory; the oldest session goes when there are ``MAX_SESSIONS``."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, str] = OrderedDict()

    def open(self, api_key: str) -> str:
        session = secrets.token_urlsafe(32)
        self._keys[token_digest(session)] = api_key
        while len(self._keys) > MAX_SESSIONS:
            self._keys.popitem(last=False)
        return session

    def key(self, session: str | None) -> str | None:
        return self._keys.get(token_digest(session)) if session else None

    def close(self, session: str | None) -> None:
        if session:
            self._keys.pop(token_digest(session), None)


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[name.strip()] = value.strip()
    return out


def _login_key(credentials_file: str, token: str) -> str | None:
    """The admin key when ``token`` is the one in the credentials file's link, else None (no file, no link)."""
    if not credentials_file or not token:
        return None
    try:
        values = _read_env(Path(credentials_file))
    except (OSError, UnicodeDecodeError):
        return None
    expected = parse_qs(urlsplit(values.get(DASHBOARD_URL_VAR, "")).query).get("token", [""])[0]
    if not expected or not hmac.compare_digest(token_digest(expected), token_digest(token)):
        return None
    return values.get(ADMIN_KEY_VAR) or None


def _router_metrics(url: str) -> str:
    """The router's metrics text: this process's registry when the gateway runs in the router's process (no url),
    else scraped from ``url``."""
    if not url:
        return generate_latest(REGISTRY).decode()
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _signed_in(response: Response, session: str) -> Response:
    response.set_cookie(COOKIE, session, path=COOKIE_PATH, httponly=True, samesite="strict")
    response.headers["cache-control"] = "no-store"
    response.headers["referrer-policy"] = "no-referrer"
    return response


def add_dashboard_routes(router: APIRouter, stub: Callable[[], metering_pb2_grpc.MeteringServiceStub], *,
                         credentials_file: str, router_metrics_url: str, timeout_s: float) -> None:
    """The dashboard's routes on ``router`` (the admin router: it owns metering's channel, ``stub()``)."""
    sessions = Sessions()

    def caller_key(request: Request) -> str:
        key = wire.parse_bearer(request.headers.get(wire.AUTHORIZATION))
        if key is None:
            key = sessions.key(request.cookies.get(COOKIE))
        if key is None:
            raise unauthenticated(NOT_SIGNED_IN, code=None)
        return key

    async def call(key: str, method: str, message: Any) -> Any:
        try:
            return await getattr(stub(), method)(message, metadata=wire.bearer_metadata(key), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_root() -> Response:
        return RedirectResponse("/dashboard/", status_code=307)

    @router.get("/dashboard/")
    async def dashboard_page() -> Response:
        """The page: a shell the script fills from ``/dashboard/api/summary`` (it shows a sign-in form on a 401)."""
        return HTMLResponse((STATIC_DIR / "dashboard.html").read_text(), headers={"cache-control": "no-store"})

    @router.get("/dashboard/static/{name}")
    async def dashboard_static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise GatewayError(404, f"Invalid URL (GET /dashboard/static/{name})")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @router.get("/dashboard/login")
    async def link_login(request: Request) -> Response:
        key = _login_key(credentials_file, request.query_params.get("token", ""))
        if key is None:
            raise unauthenticated("This dashboard link is not valid (the stack that printed it has stopped?).",
                                  code="invalid_login_token")
        return _signed_in(RedirectResponse("/dashboard/", status_code=303), sessions.open(key))

    @router.post("/dashboard/login")
    async def key_login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        key = (form.get("api_key") or [""])[0].strip()
        if not key:
            raise GatewayError(400, "Missing 'api_key'.", param="api_key")
        await call(key, "WhoAmI", metering_pb2.WhoAmIRequest())  # a 401 for a key metering does not know
        return _signed_in(RedirectResponse("/dashboard/", status_code=303), sessions.open(key))

    @router.post("/dashboard/logout")
    async def logout(request: Request) -> Response:
        sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse("/dashboard/", status_code=303)
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
        return response

    @router.get("/dashboard/api/summary")
    async def summary(request: Request) -> Response:
        """Everything the page shows, for the caller's key (admin: every key, budgets, the router's latency)."""
        key = caller_key(request)
        me: metering_pb2.ApiKeyInfo = await call(key, "WhoAmI", metering_pb2.WhoAmIRequest())
        admin = "admin" in me.scopes
        now = datetime.now(UTC)
        start = Timestamp()
        start.FromDatetime(datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=DAYS - 1))
        filters: dict[str, Any] = {} if admin else {"key_id": me.key_id}
        usage, recent = await asyncio.gather(
            call(key, "GetUsageSummary", metering_pb2.GetUsageSummaryRequest(start=start, **filters)),
            call(key, "ListUsage", metering_pb2.ListUsageRequest(limit=RECENT, **filters)))
        body: dict[str, Any] = {"object": "dashboard", "time": time.time(), "currency": "USD", "days": DAYS,
                                "viewer": {"key_id": me.key_id, "name": me.name, "tenant": me.tenant_id,
                                           "admin": admin}}
        if admin:
            keys, budgets = await asyncio.gather(call(key, "ListKeys", metering_pb2.ListKeysRequest()),
                                                 call(key, "ListBudgets", metering_pb2.ListBudgetsRequest()))
            body["keys"] = keys_section(keys.keys, budgets.budgets)
            names = {k.key_id: k.name for k in keys.keys}
            try:
                body["latency"] = latency_section(await asyncio.to_thread(_router_metrics, router_metrics_url))
            except OSError as exc:
                body["latency"] = {"unavailable": f"the router's metrics could not be read: {exc}"}
        else:  # a key sees itself only; budgets and the router's (every key's) latency are the admin's
            body["keys"] = keys_section([me], [])
            names = {me.key_id: me.name}
        body["usage"] = usage_section(list(usage.rows), names)
        body["recent"] = recent_section(recent.records)
        return JSONResponse(body, headers={"cache-control": "no-store"})
