"""The client half of scripts/compose_smoke.sh: the official ``openai`` client through Envoy's published port of
the compose stack (chat, not streamed and streamed, and embeddings), ``GET /v1/usage``, and the usage records in
the stack's own PostgreSQL, which must hold exactly the token counts the client was told.

    INFERPLANE_SMOKE_API_KEY=... python scripts/compose_smoke_client.py --base-url http://127.0.0.1:18480/v1 \\
        --psql 'podman exec inferplane-smoke_postgres_1 psql -U inferplane -d inferplane'

It needs only ``openai``; PostgreSQL is read with ``psql`` in the postgres
container (the ``--psql`` command), so nothing of the project is imported. Exit status 0 when every check
holds; each failed check is printed and the status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from decimal import Decimal

import openai
from openai.types.chat import ChatCompletionMessageParam

CHAT_MODEL = "tiny-llama"
EMBEDDING_MODEL = "all-minilm-l6-v2"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Return the absolute path of a file."}]
NANOS_PER_USD = Decimal(10) ** 9


@dataclass(frozen=True)
class Told:
    """What the client was told about one request."""

    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal | None  # usage.cost (USD, a decimal string), when the response carries it


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failed.append(what)


def _cost(usage: object) -> Decimal | None:
    extra = getattr(usage, "model_extra", None) or {}
    value = extra.get("cost")
    return None if value is None else Decimal(str(value))


def run_client(client: openai.OpenAI, checks: Checks) -> list[Told]:
    told: list[Told] = []
    tag = uuid.uuid4().hex[:12]

    rid = f"smoke-{tag}-chat"
    started = time.monotonic()
    full = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0, extra_headers={"x-request-id": rid})
    chat = full.parse()
    usage = chat.usage
    checks.check(usage is not None and usage.completion_tokens > 0 and bool(chat.choices[0].message.content),
                 f"chat: {usage.completion_tokens if usage else '?'} tokens of text "
                 f"({time.monotonic() - started:.2f} s)")
    checks.check(full.headers.get("x-request-id") == rid, "chat: the request id came back")
    if usage is not None:
        told.append(Told(rid, CHAT_MODEL, usage.prompt_tokens, usage.completion_tokens, _cost(usage)))

    rid = f"smoke-{tag}-stream"
    started = time.monotonic()
    chunks = list(client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-request-id": rid}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1] if chunks else None
    stream_usage = last.usage if last is not None else None
    checks.check(stream_usage is not None and len(chunks) > 2 and text == chat.choices[0].message.content,
                 f"chat streamed: {len(chunks)} chunks, the same text as not streamed "
                 f"({time.monotonic() - started:.2f} s)")
    if stream_usage is not None:
        told.append(Told(rid, CHAT_MODEL, stream_usage.prompt_tokens, stream_usage.completion_tokens,
                         _cost(stream_usage)))

    rid = f"smoke-{tag}-embed"
    started = time.monotonic()
    raw = client.embeddings.with_raw_response.create(
        model=EMBEDDING_MODEL, input=["a compose stack in containers", "Envoy at the edge"],
        extra_headers={"x-request-id": rid})
    emb = raw.parse()
    checks.check(len(emb.data) == 2 and len(emb.data[0].embedding) == 384 and emb.usage.prompt_tokens > 0,
                 f"embeddings: {len(emb.data)} vectors of {len(emb.data[0].embedding) if emb.data else 0}, "
                 f"{emb.usage.prompt_tokens} prompt tokens ({time.monotonic() - started:.2f} s)")
    told.append(Told(rid, EMBEDDING_MODEL, emb.usage.prompt_tokens, 0, _cost(emb.usage)))
    return told


def ledger(psql: list[str], told: list[Told]) -> dict[str, tuple[str, int, int, int]]:
    ids = ", ".join(f"'{t.request_id}'" for t in told)  # our own ids: [a-z0-9-] only
    sql = (f"SELECT request_id, model, prompt_tokens, completion_tokens, cost_nanos FROM usage_records "
           f"WHERE request_id IN ({ids})")
    out = subprocess.run([*psql, "-At", "-F", "\t", "-c", sql], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = {}
    for line in out.splitlines():
        request_id, model, prompt, completion, cost = line.split("\t")
        rows[request_id] = (model, int(prompt), int(completion), int(cost))
    return rows


def check_ledger(psql: list[str], told: list[Told], checks: Checks, deadline_s: float) -> None:
    # The router writes each record to its outbox before answering and ships it to metering right after:
    # wait for all of them, on a generous deadline.
    started = time.monotonic()
    rows = ledger(psql, told)
    while len(rows) < len(told) and time.monotonic() - started < deadline_s:
        time.sleep(1)
        rows = ledger(psql, told)
    checks.check(len(rows) == len(told), f"PostgreSQL: {len(rows)} of {len(told)} usage records "
                 f"({time.monotonic() - started:.1f} s after the last answer)")
    for t in told:
        row = rows.get(t.request_id)
        if row is None:
            continue
        model, prompt, completion, cost_nanos = row
        checks.check((model, prompt, completion) == (t.model, t.prompt_tokens, t.completion_tokens),
                     f"PostgreSQL {t.request_id}: {model} {prompt}+{completion} tokens; the client was told "
                     f"{t.model} {t.prompt_tokens}+{t.completion_tokens}")
        if t.cost is not None:
            checks.check(t.cost * NANOS_PER_USD == cost_nanos,
                         f"PostgreSQL {t.request_id}: cost {cost_nanos} nano-USD; the client was told ${t.cost}")


def check_usage_route(base_url: str, api_key: str, told: list[Told], checks: Checks) -> None:
    request = urllib.request.Request(f"{base_url}/usage", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    checks.check(status == 200, f"GET /v1/usage: HTTP {status}")
    if status != 200:
        return
    rows = json.loads(body)["data"]
    for model in sorted({t.model for t in told}):
        mine = [t for t in told if t.model == model]
        got = [r for r in rows if r["model"] == model]
        summed = (sum(r["requests"] for r in got), sum(r["prompt_tokens"] for r in got),
                  sum(r["completion_tokens"] for r in got))
        expected = (len(mine), sum(t.prompt_tokens for t in mine), sum(t.completion_tokens for t in mine))
        checks.check(summed == expected, f"GET /v1/usage {model}: requests, prompt, completion tokens {summed}; "
                     f"the client was told {expected}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the edge's /v1 URL, e.g. http://127.0.0.1:18480/v1")
    parser.add_argument("--psql", required=True, help="a command that runs psql on the stack's database")
    parser.add_argument("--ledger-deadline-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    api_key = os.environ.get("INFERPLANE_SMOKE_API_KEY", "")
    if not api_key:
        print("compose_smoke_client: set INFERPLANE_SMOKE_API_KEY", file=sys.stderr)
        return 2
    checks = Checks()
    client = openai.OpenAI(base_url=args.base_url, api_key=api_key, max_retries=0, timeout=300)
    models = {m.id for m in client.models.list().data}
    checks.check({CHAT_MODEL, EMBEDDING_MODEL} <= models, f"GET /v1/models: {sorted(models)}")
    told = run_client(client, checks)
    check_ledger(shlex.split(args.psql), told, checks, args.ledger_deadline_s)
    check_usage_route(args.base_url, api_key, told, checks)
    if checks.failed:
        print(f"compose_smoke_client: {len(checks.failed)} check(s) failed", flush=True)
        return 1
    print("compose_smoke_client: every check held", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
