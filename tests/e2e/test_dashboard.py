"""The usage dashboard in headless Chromium against the running stack: after known traffic from two keys the page,
opened through the sign-in link ``inferplane up`` prints, shows the same tokens and spend as ``/v1/usage`` says for
each key; a key's own view holds nothing of another key's; the link's token reaches no log."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from inferplane.cli.launcher import LocalStack
from tests.conftest import require

pytestmark = pytest.mark.e2e

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
SUMS = ("requests", "prompt_tokens", "completion_tokens", "cancelled_requests", "cost")


def chromium() -> str:
    found = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    require(found is not None, "no Chromium: scripts/ensure_chromium.sh installs Debian's `chromium`")
    assert found is not None
    return found


def dump_dom(browser: str, url: str, profile: Path) -> str:
    """The page's DOM once its script has run: one browser session, so the link's cookie reaches the page."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


class Tables(HTMLParser):
    """Each ``<table id=...>``'s rows as {data-field: text}, with the row's data-* attributes; element texts by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.by_id: dict[str, str] = {}
        self._table: str | None = None
        self._row: dict[str, str] | None = None
        self._field: str | None = None
        self._id: str | None = None
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = {k: v or "" for k, v in a.items() if k.startswith("data-")}
            self.tables[self._table].append(self._row)
        elif tag == "td" and self._row is not None:
            self._field = a.get("data-field")
        if a.get("id"):
            self._id = a["id"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table, self._row = None, None
        elif tag == "td":
            self._field = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._field is not None:
            self._row[self._field] = self._row.get(self._field, "") + data
        if self._id is not None and data.strip():
            self.by_id[self._id] = data.strip()
            self._id = None


def _usage(base: str, key: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{base}/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)
    resp.raise_for_status()
    return list(resp.json()["data"])


def _wait_for_usage(base: str, key: str, requests: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 120
    while True:
        rows = _usage(base, key)
        if sum(r["requests"] for r in rows) >= requests or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"requests": sum(int(r["requests"]) for r in rows),
            "prompt_tokens": sum(int(r["prompt_tokens"]) for r in rows),
            "completion_tokens": sum(int(r["completion_tokens"]) for r in rows),
            "cancelled_requests": sum(int(r["cancelled_requests"]) for r in rows),
            "cost": sum((Decimal(r["cost"]) for r in rows), Decimal(0))}


def _traffic(base_url: str, key: str, *, chats: int) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    for i in range(chats):
        messages = [{"role": "user", "content": f"Question {i}: what does zip do?"}]
        if i % 2:
            for _ in client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12,  # type: ignore[arg-type]
                                                    stream=True):
                pass
        else:
            client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12)  # type: ignore[arg-type]
    client.embeddings.create(model="all-minilm-l6-v2", input=["usage dashboard", "headless chromium"])


def test_the_page_shows_what_v1_usage_says(stack: LocalStack, tmp_path: Path) -> None:
    browser = chromium()
    base = stack.base_url.removesuffix("/v1")
    admin_key = stack.create_admin_key()
    admin = {"authorization": f"Bearer {admin_key}"}
    keys = {}
    for name, budget in (("dash-a", None), ("dash-b", {"limit": "2.50", "period": "monthly"})):
        body = {"name": name, "tenant": name, **({"budget": budget} if budget else {})}
        resp = httpx.post(f"{base}/admin/keys", json=body, headers=admin, timeout=30)
        assert resp.status_code == 201, resp.text
        keys[name] = resp.json()
    _traffic(stack.base_url, keys["dash-a"]["api_key"], chats=3)
    _traffic(stack.base_url, keys["dash-b"]["api_key"], chats=2)
    expected = {k["id"]: _wait_for_usage(base, k["api_key"], n) for k, n in ((keys["dash-a"], 4), (keys["dash-b"], 3))}
    assert [_totals(rows)["requests"] for rows in expected.values()] == [4, 3]

    # as `inferplane up` does: the link and the admin key in the credentials file (put back afterwards: the
    # session stack's local.env holds the demo key only, which test_no_plaintext_keys checks)
    link = stack.dashboard_link()
    token = link.partition("token=")[2]
    assert token and token not in (admin_key, keys["dash-a"]["api_key"], keys["dash-b"]["api_key"])
    env_file = stack.state / "local.env"
    saved = env_file.read_text()
    stack.write_env(stack.api_key, admin_key, link)  # type: ignore[attr-defined]
    try:
        dom = dump_dom(browser, link, tmp_path / "profile")
    finally:
        env_file.write_text(saved)
    page = Tables()
    page.feed(dom)
    assert page.body.get("data-state") == "ready", page.by_id.get("error")
    assert page.by_id["who"] == "admin: every key"

    by_key = {row["data-key-id"]: row for row in page.tables["by-key"] if "data-key-id" in row}
    for key_id, rows in expected.items():
        want = _totals(rows)
        shown = by_key[key_id]
        assert {f: int(shown[f]) for f in SUMS if f != "cost"} == {f: want[f] for f in SUMS if f != "cost"}, key_id
        assert Decimal(shown["cost"]) == want["cost"], key_id
        # every (day, key, model) row exactly as /v1/usage gives it, money as the same exact string
        page_rows = [r for r in page.tables["rows"] if r.get("data-key-id") == key_id]
        assert sorted((r["date"], r["model"], int(r["requests"]), int(r["prompt_tokens"]),
                       int(r["completion_tokens"]), r["cost"]) for r in page_rows) == \
            sorted((r["date"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cost"])
                   for r in rows)
    budgets = {row["data-key-id"]: row for row in page.tables["keys"] if "data-key-id" in row}
    spent_b = _totals(expected[keys["dash-b"]["id"]])["cost"]
    assert Decimal(budgets[keys["dash-b"]["id"]]["spent"]) == spent_b
    assert Decimal(budgets[keys["dash-b"]["id"]]["left"]) == Decimal("2.50") - spent_b  # nothing reserved now
    recent = [row for row in page.tables["recent"] if row.get("data-key-id") in expected]
    assert {row["data-key-id"] for row in recent} == set(expected)
    # each with its trace id, which is the trace of that request (every request is exported in this stack)
    assert all(re.fullmatch(r"[0-9a-f]{32}", row["trace_id"]) for row in recent), recent
    deadline = time.monotonic() + 60
    while True:
        traces = (stack.state / "traces.jsonl").read_text(errors="replace")
        missing = [row["trace_id"] for row in recent if row["trace_id"] not in traces]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing
    assert float(page.by_id["router-requests"]) >= 7 and page.by_id["ttft-p50"].endswith(" ms")

    # the link's token reaches no log and no trace, and the link is over once the credentials file has no link
    assert httpx.get(link, timeout=30).status_code == 401
    for path in [*(stack.state / "logs").glob("*.log"), stack.state / "traces.jsonl"]:
        if path.exists():
            assert token not in path.read_text(errors="replace"), path


def test_a_keys_own_view_and_its_sign_in(stack: LocalStack) -> None:
    base = stack.base_url.removesuffix("/v1")
    admin = {"authorization": f"Bearer {stack.create_admin_key()}"}
    mine, other = (httpx.post(f"{base}/admin/keys", json={"name": n}, headers=admin, timeout=30).json()
                   for n in ("own-view", "someone-else"))
    _traffic(stack.base_url, mine["api_key"], chats=1)
    _traffic(stack.base_url, other["api_key"], chats=1)
    _wait_for_usage(base, mine["api_key"], 2)
    _wait_for_usage(base, other["api_key"], 2)

    # the key as bearer, then as a session opened with the sign-in form: the same view, its own rows only
    with httpx.Client(base_url=base, timeout=30) as client:
        bearer = client.get("/dashboard/api/summary", headers={"authorization": f"Bearer {mine['api_key']}"})
        assert bearer.status_code == 200, bearer.text
        assert client.get("/dashboard/api/summary").status_code == 401
        refused = client.post("/dashboard/login", data={"api_key": "sk-ip-not-a-key"})
        assert refused.status_code == 401 and "set-cookie" not in refused.headers
        signed = client.post("/dashboard/login", data={"api_key": mine["api_key"]})
        assert signed.status_code == 303 and signed.headers["location"] == "/dashboard/"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and mine["api_key"].lower() not in cookie
        session = client.get("/dashboard/api/summary")
        assert session.status_code == 200, session.text
        assert client.get("/dashboard/login", params={"token": mine["api_key"]}).status_code == 401  # not a token
    for view in (bearer.json(), session.json()):
        assert view["viewer"] == {"key_id": mine["id"], "name": "own-view", "tenant": "default", "admin": False}
        assert {r["key_id"] for r in view["usage"]["rows"]} == {mine["id"]}
        assert {r["key_id"] for r in view["recent"]} == {mine["id"]}
        assert [k["key_id"] for k in view["keys"]] == [mine["id"]]
        assert "latency" not in view  # every key's traffic: the admin's
        assert view["usage"]["totals"]["requests"] == _totals(_usage(base, mine["api_key"]))["requests"]
