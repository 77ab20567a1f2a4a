"""The guard in front of `picochat serve` (issue 8, HTTP layer): body limit, Host check, cross-site
requests, security headers, /docs, HEAD /health, API keys and principals, CLI refusals.

A real server process where the finding lives below the app (uvicorn's parser: body framing; the
Host list `picochat serve` computes); TestClient for the rest.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from picochat.errors import PicochatError
from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store
from tests.conftest import picochat_cmd, subprocess_env
from tests.serve.conftest import free_port

USER = [{"role": "user", "content": "Hello there"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def host(tiny_chat_ckpt):
    return load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=2, max_context=512)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "g.db")
    yield s
    s.close()


@pytest.fixture
def client(host, store):
    with TestClient(create_app([host], store=store)) as c:
        yield c


def raw_request(port: int, head: bytes, body_chunks=(), timeout: float = 30) -> bytes:
    """Send `head` then the body chunks from a thread (the server may answer before it read them all),
    and return the response bytes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send_body():
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: fine
    s.sendall(head)
    t = threading.Thread(target=send_body, daemon=True)
    t.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    finally:
        s.close()
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def status_and_json(data: bytes):
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


# Finding 2: `Content-Length: 2` plus `Transfer-Encoding: chunked` made the old middleware trust the
# announced 2 bytes while the body was read by chunks: 5 MB (limit 4 MB) was read and parsed.
@pytest.mark.slow
def test_content_length_plus_chunked_is_refused(tiny_server):
    port = int(tiny_server.url.rsplit(":", 1)[1])
    big = b'{"title": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    chunks = [b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536]) for i in range(0, len(big), 65536)]
    head = (b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, body = status_and_json(raw_request(port, head, [*chunks, b"0\r\n\r\n"]))
    assert status in (400, 413), (status, body)
    assert body and body["error"]["code"] in ("invalid_body_framing", "request_too_large"), body


# Finding 2, below the parser: whatever Content-Length says, the bytes that arrive are what count.
def test_body_bytes_are_counted_whatever_the_headers_say():
    from picochat.serve.guard import GuardMiddleware
    seen = []

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        seen.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = GuardMiddleware(app, keys={}, max_body=1000, counters={})
    sent = []
    parts = [{"type": "http.request", "body": b"x" * 300, "more_body": i < 9} for i in range(10)]

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)
    scope = {"type": "http", "method": "POST", "path": "/api/conversations", "scheme": "http",
             "client": ("127.0.0.1", 5), "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"2"),
                                                     (b"content-type", b"application/json")]}
    asyncio.run(guard(scope, receive, send))
    assert seen == [] and sent[0]["status"] == 413, (seen, sent[:1])


# Finding 3: DNS rebinding. The page of a hostname rebound to 127.0.0.1 sends its own Host.
@pytest.mark.slow
def test_only_the_bound_names_are_answered(tiny_server):
    port = int(tiny_server.url.rsplit(":", 1)[1])

    def get(path, host_value):
        return status_and_json(raw_request(port, f"GET {path} HTTP/1.1\r\nHost: {host_value}\r\n"
                                                 "Connection: close\r\n\r\n".encode()))
    for path in ("/api/conversations", "/", "/v1/models", "/health"):
        status, body = get(path, "rebind.attacker.example:8000")
        assert status == 400 and body["error"]["code"] == "invalid_host", (path, status, body)
    head = (b"POST /api/conversations HTTP/1.1\r\nHost: rebind.attacker.example\r\nContent-Type: application/json"
            b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status_and_json(raw_request(port, head))[0] == 400
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST."):
        assert get("/api/conversations", good)[0] == 200, good


def test_allowed_hosts(host, store):
    from picochat.serve.guard import allowed_hosts_for
    app = create_app([host], store=store, allowed_hosts=["chat.example.org", "*.lan"])
    with TestClient(app, base_url="http://chat.example.org:8443") as c:
        assert c.get("/api/conversations").status_code == 200
        assert c.get("/api/conversations", headers={"Host": "box.lan"}).status_code == 200
        assert c.get("/api/conversations", headers={"Host": "testserver"}).json()["error"]["code"] == "invalid_host"
        assert c.get("/api/conversations", headers={"Host": "evil.example.org"}).status_code == 400
    loop = allowed_hosts_for("127.0.0.1")
    assert {"127.0.0.1", "localhost", "::1"} <= set(loop) and socket.gethostname().lower() not in loop
    wild = allowed_hosts_for("0.0.0.0", ["chat.example.org"])
    assert {"127.0.0.1", "localhost", "::1", socket.gethostname().lower(), "chat.example.org"} <= set(wild)
    with pytest.raises(PicochatError, match="without a port"):
        allowed_hosts_for("127.0.0.1", ["example.org:80"])


# Finding 9: cross-site requests (a key-less server) created conversations with an empty text/plain POST.
def test_cross_site_requests_are_refused(client, store):
    r = client.post("/api/conversations", content=b"", headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert r.status_code == 415, r.text
    r = client.post("/api/conversations", content=b"{}", headers={"Content-Type": ""})
    assert r.status_code == 415, r.text
    assert client.post("/api/conversations", content=b"{}").status_code == 415  # no Content-Type at all
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://testserver:8080"}):
        r = client.post("/api/conversations", json={}, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request", (headers, r.text)
    assert store.list_conversations() == []
    # the page (same origin) and plain clients keep working
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    cid = client.post("/api/conversations", json={"title": "t"}, headers=same).json()["id"]
    assert client.patch(f"/api/conversations/{cid}", json={"title": "u"}, headers=same).status_code == 200
    assert client.delete(f"/api/conversations/{cid}", headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.delete(f"/api/conversations/{cid}", headers=same).status_code == 200
    r = client.post("/v1/chat/completions", content=json.dumps({"messages": USER, "max_tokens": 2}),
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_cors_origins_may_call_the_api_and_no_one_else(host, store):
    """--cors-origin: a page served elsewhere gets a preflight (without the key: browsers send none) and
    Access-Control-Allow-Origin; an origin not listed stays refused as cross-site, and gets no CORS header."""
    app = create_app([host], store=store, api_key="k", cors_origins=["http://localhost:5173"])
    with TestClient(app) as c:
        pre = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:5173",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "Authorization" in pre.headers["access-control-allow-headers"]
        assert "x-stainless-os" in pre.headers["access-control-allow-headers"]  # (openai-node's own headers)
        page = {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "cross-site", "Authorization": "Bearer k"}
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, headers=page)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert r.headers["vary"] == "Origin"
        assert c.post("/v1/chat/completions", json={"messages": USER}, headers=page | {"Authorization": "Bearer x"}
                      ).status_code == 401  # the key is still needed
        evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Authorization": "Bearer k"}
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, headers=evil)
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers and r.headers["vary"] == "Origin"
        assert c.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"}
                         ).headers.get("access-control-allow-origin") is None
    for bad in ("*", "localhost:5173", "http://a.example/path", "ftp://a.example"):
        with pytest.raises(PicochatError, match="is not an origin"):
            create_app([host], store=store, cors_origins=[bad])


def test_the_openai_client_still_works(client):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    out = oai.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
    assert out.choices[0].message.role == "assistant"


# Finding 11: security headers (also on streamed answers, which must still stream), /docs, HEAD /health.
def test_security_headers(client):
    for r in (client.get("/"), client.get("/static/app.js"), client.get("/nope"), client.get("/v1/models")):
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (r.url, csp)
        assert "unsafe" not in csp
        assert r.headers.get("x-content-type-options") == "nosniff"
        assert r.headers.get("x-frame-options") == "DENY"
        assert r.headers.get("referrer-policy") == "no-referrer"
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("x-content-type-options") == "nosniff"
        events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert len(events) >= 3 and events[-1] == "data: [DONE]"


def test_no_cdn_docs_and_head_health(client):
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""


# Finding 4 (HTTP part): several keys, one per user or tool; the key used names the principal.
def test_several_keys_and_principals(host, store):
    app = create_app([host], store=store, api_key={"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"})

    @app.get("/whoami")
    async def whoami(request: Request):
        return {"principal": request.state.principal, "client": request.state.client}
    with TestClient(app) as c:
        for name in ("alice", "bob"):
            r = c.get("/whoami", headers={"Authorization": f"Bearer {name}-key-0123456789"})
            assert r.json() == {"principal": name, "client": name}, r.text
        assert c.get("/whoami", headers={"Authorization": "Bearer carol"}).status_code == 401
        assert c.get("/whoami").status_code == 401
        assert c.get("/health").status_code == 200
        assert c.get("/api/config", headers={"Authorization": "bearer bob-key-0123456789"}).json()["auth"] is True
    plain = create_app([host], store=store)

    @plain.get("/whoami")
    async def whoami2(request: Request):
        return {"principal": request.state.principal, "client": request.state.client}
    with TestClient(plain) as c:
        assert c.get("/whoami").json() == {"principal": None, "client": "testclient"}


def test_key_formats(tmp_path, monkeypatch):
    from picochat.serve.cli import ServeConfig, api_keys
    monkeypatch.setenv("PICOCHAT_API_KEY", "alice k-alice-0123, bob k-bob-01234,k-third-0123")
    assert api_keys(ServeConfig()) == {"alice": "k-alice-0123", "bob": "k-bob-01234", "key3": "k-third-0123"}
    f = tmp_path / "keys.txt"
    f.write_text("# one a line\n\nci   k-ci-0123456789\nk-anon-012345\n")
    # the flags win over the environment, and add up
    assert api_keys(ServeConfig(api_key="dev k-dev-0123456", api_key_file=str(f))) == {
        "dev": "k-dev-0123456", "ci": "k-ci-0123456789", "key3": "k-anon-012345"}
    monkeypatch.delenv("PICOCHAT_API_KEY")
    assert api_keys(ServeConfig()) == {}
    for bad, needle in [(dict(api_key="clé-secrète-longue"), "non-ASCII"), (dict(api_key="a\tb c d"), "words"),
                        (dict(api_key="key\x7fwith-del"), "control"), (dict(api_key=""), "no key"),
                        (dict(api_key="x k-0123456789,y k-0123456789"), "another entry"),
                        (dict(api_key="a k-0123456789,a k-9876543210"), "both named"),
                        (dict(api_key_file=str(tmp_path / "missing")), "cannot read")]:
        with pytest.raises(PicochatError, match=needle):
            api_keys(ServeConfig(**bad))
    with pytest.raises(PicochatError, match="non-ASCII"):
        create_app([object()], api_key="clé")


def test_network_host_needs_a_key(monkeypatch):
    from picochat.serve.cli import ServeConfig, _check
    monkeypatch.delenv("PICOCHAT_API_KEY", raising=False)
    for h in ("0.0.0.0", "::", "192.168.1.10", "myhost.example"):
        with pytest.raises(PicochatError, match="--insecure-no-key"):
            _check(ServeConfig(host=h))
    _check(ServeConfig(host="0.0.0.0", insecure_no_key=True))
    _check(ServeConfig(host="0.0.0.0", api_key="k-0123456789abcdef"))
    for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        _check(ServeConfig(host=h))


@pytest.mark.slow
def test_cli_refusals_and_help(tmp_path):
    def serve(*args, **env):
        return subprocess.run(picochat_cmd("serve", "/no/such/checkpoint", "--port", str(free_port()), "--db",
                                           str(tmp_path / "x.db"), *args),
                              env=subprocess_env(**env), capture_output=True, text=True, timeout=120)
    for r, needle in [(serve("--api-key", "clé-secrète-longue"), "non-ASCII"),
                      (serve(PICOCHAT_API_KEY="one two three,  ok-key-012345"), "words"),
                      (serve("--host", "0.0.0.0", PICOCHAT_API_KEY=""), "--insecure-no-key")]:
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    out = subprocess.run(picochat_cmd("serve", "--help"), env=subprocess_env(), capture_output=True,
                         text=True).stdout
    for needle in ("--api-key-file", "PICOCHAT_API_KEY", "`ps`", "--allowed-hosts", "--insecure-no-key", "NAME KEY"):
        assert needle in out, needle
