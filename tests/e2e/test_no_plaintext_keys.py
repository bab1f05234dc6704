"""No plaintext API key in anything the stack writes: its logs, its traces, its databases, its state directory.

Real traffic through the edge with several keys (the demo key, an admin key, keys made over ``POST /admin/keys``,
one of them revoked), and failed attempts that carry key material where it could leak: one-character variants of
real keys, a real key on an admin route, keys in malformed ``Authorization`` headers and in headers nobody reads.
Then every file under the state directory is scanned as bytes, with SQL dumps of metering's SQLite database and
the router's outbox, for each key, its secret part (``sk-ip-<key id>-<secret>``: the id may appear, the secret
must not) and the secret's first and last 16 characters (a truncated key is a leak too).

The one file allowed to hold a key is ``local.env``: the credentials file ``inferplane up`` writes for the user
(mode 0600), with the demo key only. Positive controls make sure the scan looks at the traffic: the request ids
sent are in the access log and the traces, the key ids and request ids are in the metering dump.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from inferplane.cli.launcher import LocalStack
from inferplane.metering.store import KEY_ID_LENGTH, KEY_PREFIX
from inferplane.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.e2e
CHAT_MODEL = "tiny-llama"
EMBED_MODEL = "all-minilm-l6-v2"
MESSAGES = [{"role": "user", "content": "Say hello."}]
CREDENTIALS_FILE = "local.env"
CHUNK = 8 * 1024 * 1024


# ---- the scanner -----------------------------------------------------------------------------------------

def key_parts(plain: str) -> tuple[str, str]:
    """``(key id, secret)`` of ``sk-ip-<key id>-<secret>``."""
    assert plain.startswith(KEY_PREFIX), plain[:8]
    rest = plain[len(KEY_PREFIX):]
    assert rest[KEY_ID_LENGTH] == "-" and len(rest) > KEY_ID_LENGTH + 16
    return rest[:KEY_ID_LENGTH], rest[KEY_ID_LENGTH + 1:]


def needles_for(name: str, plain: str) -> dict[str, bytes]:
    """What must not appear for one key: the key, its secret, and the secret's head and tail."""
    _, secret = key_parts(plain)
    return {name: plain.encode(), f"{name} (secret)": secret.encode(),
            f"{name} (secret head)": secret[:16].encode(), f"{name} (secret tail)": secret[-16:].encode()}


def hex_forms(needles: dict[str, bytes]) -> dict[str, bytes]:
    """The needles as an SQL dump writes a BLOB (``X'…'``), in either case."""
    out: dict[str, bytes] = {}
    for name, value in needles.items():
        out[f"{name} as hex"] = value.hex().encode()
        out[f"{name} as HEX"] = value.hex().upper().encode()
    return out


def _occurs(read: Callable[[int], bytes], needles: dict[str, bytes]) -> set[str]:
    """The needles found in a stream of bytes, read in chunks that overlap by the longest needle."""
    overlap = max(len(n) for n in needles.values()) - 1
    found: set[str] = set()
    tail = b""
    while chunk := read(CHUNK):
        window = tail + chunk
        found |= {name for name, value in needles.items() if value in window}
        tail = window[-overlap:] if overlap > 0 else b""
    return found


def scan_tree(root: Path, needles: dict[str, bytes]) -> tuple[dict[str, set[str]], int]:
    """``{relative path: needles found}`` over every regular file under ``root``, and how many files were read.
    Links are not followed: what they point to is not the stack's writing (e.g. model files)."""
    hits: dict[str, set[str]] = {}
    files = 0
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(dirpath, filename)
            if path.is_symlink() or not path.is_file():
                continue
            files += 1
            with path.open("rb") as f:
                found = _occurs(f.read, needles)
            if found:
                hits[str(path.relative_to(root))] = found
    return hits, files


def sqlite_dump(path: Path) -> bytes:
    """A full SQL dump (schema and rows) of an SQLite file, opened read-only so the running service is undisturbed."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return "\n".join(conn.iterdump()).encode()
    finally:
        conn.close()


def scan_bytes(blob: bytes, needles: dict[str, bytes]) -> set[str]:
    view = memoryview(blob)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = bytes(view[pos:pos + n])
        pos += n
        return out

    return _occurs(read, needles)


def test_the_scanner_finds_a_planted_key(tmp_path: Path) -> None:
    """The scan can fail: a key planted in a nested file, split across a chunk boundary, or in an SQLite BLOB
    is reported where it is, and a key id alone is not."""
    plain = f"{KEY_PREFIX}AbCdEfGh1234-0123456789abcdefghij_klmnopqrstuvwxyz-ABCDEFG"
    key_id, secret = key_parts(plain)
    needles = needles_for("planted", plain)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "svc.log").write_text(f'{{"msg": "bad key {plain}"}}\n')
    (tmp_path / "only-the-id.log").write_text(f"key {key_id} ok\n")
    (tmp_path / "tail.log").write_text(f"...{secret[-16:]}\n")
    (tmp_path / "boundary.bin").write_bytes(b"x" * (CHUNK - 10) + plain.encode())
    db = tmp_path / "blob.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (record BLOB)")
        conn.execute("INSERT INTO t VALUES (?)", (b"\x0a\x2b" + plain.encode(),))
    conn.close()
    hits, files = scan_tree(tmp_path, needles)
    assert files == 5
    assert set(hits) == {"logs/svc.log", "tail.log", "boundary.bin", "blob.db"}
    assert "planted" in hits["logs/svc.log"] and "planted (secret)" in hits["logs/svc.log"]
    assert hits["tail.log"] == {"planted (secret tail)"}
    assert "planted" in hits["boundary.bin"]
    dump = sqlite_dump(db)
    assert "planted" not in scan_bytes(dump, needles)  # the dump hex-encodes a BLOB ...
    assert "planted as HEX" in scan_bytes(dump, hex_forms(needles))  # ... which the hex forms catch
    assert scan_bytes(b"nothing here " + key_id.encode(), needles) == set()


# ---- the traffic -----------------------------------------------------------------------------------------

@dataclass
class Traffic:
    stack: LocalStack
    keys: dict[str, str] = field(default_factory=dict)  # name -> plain key (real ones)
    wrong: dict[str, str] = field(default_factory=dict)  # name -> plain key-like string that is no key
    request_ids: list[str] = field(default_factory=list)  # every REST request: access log and traces have them
    grpc_request_ids: list[str] = field(default_factory=list)  # gRPC requests through the edge: access log
    usage_request_ids: list[str] = field(default_factory=list)  # requests that leave a usage record

    def rid(self, *, billed: bool = False, rest: bool = True) -> str:
        rid = f"np-{uuid.uuid4().hex[:16]}"
        (self.request_ids if rest else self.grpc_request_ids).append(rid)
        if billed:
            self.usage_request_ids.append(rid)
        return rid

    @property
    def root(self) -> str:
        return self.stack.base_url.removesuffix("/v1")

    def call(self, method: str, path: str, authorization: str | None, *, expect: int, billed: bool = False,
             stream: bool = False, **kw: Any) -> httpx.Response:
        headers = {"x-request-id": self.rid(billed=billed), **kw.pop("headers", {})}
        if authorization is not None:
            headers["authorization"] = authorization
        with httpx.Client(timeout=120) as http:
            if stream:
                with http.stream(method, self.root + path, headers=headers, **kw) as resp:
                    lines = list(resp.iter_lines())
                    assert resp.status_code == expect, (method, path, resp.status_code)
                    assert [x for x in lines if x][-1] == "data: [DONE]", lines[-3:]
                    return resp
            resp = http.request(method, self.root + path, headers=headers, **kw)
        assert resp.status_code == expect, (method, path, resp.status_code, resp.text[:300])
        if expect >= 400:
            assert resp.json()["error"]["message"]
        return resp


def one_char_variants(plain: str) -> list[str]:
    """A key with the last character of its secret changed, and one with a character of its id changed."""
    key_id, secret = key_parts(plain)
    flip = {"a": "b"}.get(secret[-1], "a")
    id_flip = "B" if key_id[0] != "B" else "C"
    return [f"{KEY_PREFIX}{key_id}-{secret[:-1]}{flip}", f"{KEY_PREFIX}{id_flip}{key_id[1:]}-{secret}"]


def use_inference_key(t: Traffic, plain: str) -> None:
    bearer = f"Bearer {plain}"
    chat = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    t.call("POST", "/v1/chat/completions", bearer, expect=200, billed=True, json=chat)
    t.call("POST", "/v1/chat/completions", bearer, expect=200, billed=True, stream=True,
           json={**chat, "stream": True, "stream_options": {"include_usage": True}})
    t.call("POST", "/v1/embeddings", bearer, expect=200, billed=True, json={"model": EMBED_MODEL, "input": "hello"})
    assert t.call("GET", "/v1/models", bearer, expect=200).json()["data"]
    assert t.call("GET", "/v1/usage", bearer, expect=200).json()["object"] == "list"
    t.call("GET", "/v1/usage", bearer, expect=200, params={"format": "csv"})
    # A real key where it has no business: an admin route (403).
    t.call("GET", "/admin/usage", bearer, expect=403)
    t.call("POST", "/admin/keys", bearer, expect=403, json={"name": "nope"})
    # The router's public gRPC service, through the edge, like any gRPC client.
    with grpc.insecure_channel(t.stack.grpc_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        rid = t.rid(billed=True, rest=False)
        msgs = list(stub.Generate(router_pb2.GenerateRequest(model=CHAT_MODEL, prompt="Hello", max_tokens=3),
                                  metadata=(("authorization", bearer), ("x-request-id", rid)), timeout=60))
        assert msgs and msgs[0].request_id == rid
        assert stub.ListModels(router_pb2.ListModelsRequest(), metadata=(("authorization", bearer),), timeout=30).models


def attempt_with_bad_material(t: Traffic, plain: str, name: str) -> None:
    """Failed attempts only: every one is refused before it does anything, so nothing here is billed."""
    chat = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2}
    for i, wrong in enumerate(one_char_variants(plain)):
        t.wrong[f"{name} variant {i}"] = wrong
        t.call("POST", "/v1/chat/completions", f"Bearer {wrong}", expect=401, json=chat)
        t.call("POST", "/v1/embeddings", f"Bearer {wrong}", expect=401, json={"model": EMBED_MODEL, "input": "x"})
        t.call("GET", "/v1/usage", f"Bearer {wrong}", expect=401)
        t.call("GET", "/admin/keys", f"Bearer {wrong}", expect=401)
        with grpc.insecure_channel(t.stack.grpc_addr) as channel, pytest.raises(grpc.RpcError) as err:
            list(router_pb2_grpc.RouterServiceStub(channel).Generate(
                router_pb2.GenerateRequest(model=CHAT_MODEL, prompt="x", max_tokens=2),
                metadata=(("authorization", f"Bearer {wrong}"),), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The real key in Authorization headers that are not "Bearer <key>".
    for malformed in (f"Bearer{plain}", f"Basic {plain}", plain, f"Bearer {plain} {plain}", f"Token: {plain}"):
        t.call("POST", "/v1/chat/completions", malformed, expect=401, json=chat)
        t.call("GET", "/v1/usage", malformed, expect=401)
        t.call("GET", "/admin/usage", malformed, expect=401)
    # ... and in headers no route reads (other APIs' conventions): the request has no key at all.
    t.call("GET", "/v1/models", None, expect=401, headers={"x-api-key": plain, "api-key": plain})
    # ... in the URL's query (the access log records the path without it) ...
    t.call("GET", "/v1/models", None, expect=401, params={"api_key": plain})
    # ... and pasted into the model field (the 404 message, which traces record, does not echo it).
    missing = t.call("POST", "/v1/chat/completions", f"Bearer {t.keys['demo key']}", expect=404,
                     json={**chat, "model": plain})
    assert plain not in missing.text


@pytest.fixture(scope="module")
def traffic(stack: LocalStack) -> Traffic:
    t = Traffic(stack)
    t.keys["demo key"] = stack.api_key  # type: ignore[attr-defined]
    t.keys["admin key"] = admin = stack.create_admin_key()
    as_admin = f"Bearer {admin}"

    made = t.call("POST", "/admin/keys", as_admin, expect=201,
                  json={"name": "np-rest", "tenant": "np-tenant", "budget": {"limit": "5.00"}}).json()
    t.keys["REST key"] = made["api_key"]
    doomed = t.call("POST", "/admin/keys", as_admin, expect=201, json={"name": "np-revoked"}).json()
    t.keys["revoked key"] = doomed["api_key"]
    assert {k["id"] for k in t.call("GET", "/admin/keys", as_admin, expect=200).json()["data"]} >= {
        made["id"], doomed["id"]}
    t.call("GET", "/admin/usage", as_admin, expect=200, params={"key_id": made["id"]})
    t.call("GET", "/admin/usage", as_admin, expect=200, params={"format": "csv"})
    t.call("GET", "/admin/budgets", as_admin, expect=200)
    t.call("GET", "/admin/prices", as_admin, expect=200)
    t.call("GET", "/v1/usage", as_admin, expect=200)
    # An admin key cannot run models: refused by the router, after the key was verified.
    t.call("POST", "/v1/chat/completions", as_admin, expect=403,
           json={"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2})

    for name in ("demo key", "REST key", "revoked key"):
        use_inference_key(t, t.keys[name])
    t.call("DELETE", f"/admin/keys/{doomed['id']}", as_admin, expect=200)
    # A revoked key, tried again (metering answers these routes itself: the router's key cache is not involved).
    t.call("GET", "/v1/usage", f"Bearer {t.keys['revoked key']}", expect=401)
    t.call("GET", "/admin/keys", f"Bearer {t.keys['revoked key']}", expect=401)
    for name, plain in t.keys.items():
        attempt_with_bad_material(t, plain, name)
    return t


def _flushed(t: Traffic) -> Iterator[str]:
    """What has not reached the files yet (empty when all has): request ids missing from the access log, the
    traces or the metering database."""
    state = t.stack.state
    access = (state / "logs" / "edge-access.log").read_text(errors="replace")
    traces = (state / "traces.jsonl").read_text(errors="replace") if (state / "traces.jsonl").exists() else ""
    dump = sqlite_dump(Path(t.stack.settings["metering"]["database_url"].removeprefix("sqlite:///"))).decode()
    for rid in t.request_ids + t.grpc_request_ids:
        if rid not in access:
            yield f"{rid} not in the access log"
    for rid in t.request_ids:
        if rid not in traces:
            yield f"{rid} not in the traces"
    for rid in t.usage_request_ids:
        if rid not in dump:
            yield f"{rid} has no usage record"


# ---- the test --------------------------------------------------------------------------------------------

def test_no_plaintext_key_in_logs_traces_databases_or_state(stack: LocalStack, traffic: Traffic) -> None:
    deadline = time.monotonic() + 30
    while (missing := list(_flushed(traffic))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, missing[:10]  # the positive control: the scan below reads this very traffic
    time.sleep(2)  # whatever was still in a buffer (logs, trace batches, the outbox)

    needles: dict[str, bytes] = {}
    for name, plain in {**traffic.keys, **traffic.wrong}.items():  # real keys first: a variant's parts that are
        for part, value in needles_for(name, plain).items():      # a real key's keep the real key's name
            if value not in needles.values():
                needles[part] = value
    state = stack.state
    metering_db = Path(stack.settings["metering"]["database_url"].removeprefix("sqlite:///"))
    outbox_db = Path(stack.settings["router"]["outbox_path"])
    assert metering_db.is_relative_to(state) and outbox_db.is_relative_to(state)

    hits, files = scan_tree(state, needles)
    assert files >= 10 and (state / "logs").is_dir() and (state / "traces.jsonl").stat().st_size > 0
    # local.env is the user's credentials file: the demo key, in full, and nothing else of anyone's.
    env_hits = hits.pop(CREDENTIALS_FILE, set())
    assert env_hits == set(needles_for("demo key", traffic.keys["demo key"]))
    assert stat.S_IMODE((state / CREDENTIALS_FILE).stat().st_mode) == 0o600
    assert hits == {}, f"plaintext key material in the state directory: {hits}"

    dumps = {"metering": sqlite_dump(metering_db), "outbox": sqlite_dump(outbox_db)}
    for db, dump in dumps.items():
        found = scan_bytes(dump, needles | hex_forms(needles))
        assert found == set(), f"plaintext key material in the {db} database dump: {sorted(found)}"
    # The dumps are the real thing: metering's has every key by id (and its hash), and the outbox its schema.
    metering_dump = dumps["metering"].decode()
    for plain in traffic.keys.values():
        assert key_parts(plain)[0] in metering_dump
    assert "CREATE TABLE" in dumps["outbox"].decode() and "outbox" in dumps["outbox"].decode()
    assert json.loads((state / "traces.jsonl").read_text().splitlines()[-1])["trace_id"]
