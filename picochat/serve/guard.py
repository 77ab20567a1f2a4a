"""The guard in front of every route: pure ASGI, so streaming responses pass straight through.

In order, for each HTTP request:
  1. Host check (DNS rebinding): a page whose hostname rebinds to 127.0.0.1 sends its own name as
     Host; only the names the server is bound to (plus --allowed-hosts) are answered.
  2. Cross-site check: a state-changing request from another site (Sec-Fetch-Site, Origin) or one a
     browser may send without a CORS preflight (a non-JSON Content-Type) is refused, unless its Origin is
     one of --cors-origin's: those get CORS (a preflight answered without a key, since browsers send none;
     Access-Control-Allow-Origin on every answer), so a browser app served elsewhere can call the API.
  3. API keys: every route but /health and the page's static files; the key used names the request's
     principal (request.state.principal, request.state.client).
  4. Body limit: the bytes that really arrive are counted, whatever Content-Length says.
Every answer gets the security headers, and counts in /metrics by status code.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from typing import Iterable, Mapping, Optional, Union
from urllib.parse import urlsplit

from ..errors import PicochatError
from .errors import ApiError

OPEN_PATHS = ("/health", "/", "/favicon.ico")  # the page holds no data: it asks for the key itself
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# the page: module scripts and a stylesheet from /static, inline SVG, a data: favicon; nothing else
CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
NEW_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


# ---------------------------------------------------------------- API keys

def check_key(key: str, where: str) -> None:
    """Refuse keys that can never match: a header is latin-1 bytes, and clients strip or mangle spaces."""
    if not key:
        raise PicochatError(f"{where}: the API key is empty")
    if not key.isascii():
        raise PicochatError(f"{where}: the API key has a non-ASCII character, which no HTTP client can send "
                            f"as-is; use printable ASCII, e.g. {NEW_KEY}")
    if not key.isprintable() or any(c.isspace() for c in key):
        raise PicochatError(f"{where}: the API key has a space or control character; use printable ASCII "
                            f"without spaces, e.g. {NEW_KEY}")


def parse_keys(text: str, where: str, *, lines: bool = False) -> list[tuple[Optional[str], str]]:
    """[(name or None, key)] from `KEY` or `NAME KEY` entries: comma-separated (--api-key,
    $PICOCHAT_API_KEY), or one per line with # comments (a key file)."""
    entries = []
    for n, raw in enumerate(text.splitlines() if lines else text.split(","), 1):
        entry = raw.strip()
        if not entry or (lines and entry.startswith("#")):
            continue
        at = f"{where} line {n}" if lines else f"{where} entry {n}"
        parts = entry.split()
        if len(parts) > 2:
            raise PicochatError(f"{at}: expected KEY or NAME KEY, got {len(parts)} words")
        name, key = (None, parts[0]) if len(parts) == 1 else parts
        if name is not None and not KEY_NAME.fullmatch(name):
            raise PicochatError(f"{at}: the key name {name!r} must be letters, digits, '.', '_', '@' or '-' "
                                "(at most 64)")
        check_key(key, at)
        entries.append((name, key))
    return entries


def name_keys(entries: Iterable[tuple[Optional[str], str]]) -> dict[str, str]:
    """{principal name: key}; an unnamed key is called keyN after its position."""
    keys: dict[str, str] = {}
    for n, (name, key) in enumerate(entries, 1):
        name = name or f"key{n}"
        if name in keys:
            raise PicochatError(f"two API keys are both named {name!r}; give each user or tool its own name")
        if key in keys.values():
            raise PicochatError(f"the API key named {name!r} is also another entry's key; give each its own key")
        keys[name] = key
    return keys


def as_keys(api_key: Union[None, str, Mapping[str, str]]) -> dict[str, str]:
    """create_app's api_key: None (no auth), one key (principal 'key1') or {name: key}."""
    if not api_key:
        return {}
    entries = [(None, api_key)] if isinstance(api_key, str) else list(api_key.items())
    for name, key in entries:
        check_key(key, f"API key {name!r}" if name else "API key")
    return name_keys(entries)


# ---------------------------------------------------------------- hosts

def _bare(name: str) -> str:
    return name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def is_loopback(host: str) -> bool:
    host = _bare(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _interface_addresses() -> set[str]:
    """The machine's own addresses (Linux; elsewhere what the resolver knows of its name)."""
    found: set[str] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, ifname in socket.if_nameindex():
                try:
                    req = struct.pack("256s", ifname.encode()[:15])
                    found.add(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]))  # SIOCGIFADDR
                except OSError:
                    pass  # an interface without an IPv4 address
    except (ImportError, OSError):
        pass
    return found


def allowed_hosts_for(bind: str, extra: Iterable[str] = ()) -> list[str]:
    """Host names a server bound to `bind` answers (any port). A wildcard bind cannot know the names
    clients use to reach it: loopback, the machine's hostname, FQDN and own addresses; more via `extra`."""
    names = {_bare(bind)} if _bare(bind) not in WILDCARD_ADDRESSES else set()
    if is_loopback(bind) or _bare(bind) in WILDCARD_ADDRESSES:
        names |= set(LOOPBACK_NAMES)
    if _bare(bind) in WILDCARD_ADDRESSES:
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(_bare(name))
            try:
                names |= {_bare(str(ai[4][0]).split("%")[0]) for ai in socket.getaddrinfo(name, None)}
            except OSError:
                pass
        names |= _interface_addresses()
    for entry in extra:
        names.add(normalize_allowed(entry))
    names.discard("")
    return sorted(names)


def normalize_allowed(entry: str) -> str:
    """One --allowed-hosts entry: a name, an address, `*` (any) or `*.domain` (its subdomains)."""
    name = _bare(entry)
    if ":" in name:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise PicochatError(f"--allowed-hosts takes names without a port (any port is answered), "
                                f"got {entry.strip()!r}") from None
    if not name:
        raise PicochatError("--allowed-hosts has an empty entry; give names separated by commas")
    return name


def split_host(value: str) -> Optional[tuple[str, Optional[int]]]:
    """'name:port' / '[v6]:port' -> (name, port or None); None when it is not a valid Host."""
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    else:
        name, _, port = value.partition(":")
        port = port if ":" in value else None
    if not name or (port is not None and not (port.isdigit() and len(port) <= 5)):
        return None
    return _bare(name), int(port) if port else None


def host_allowed(name: str, allowed: Iterable[str]) -> bool:
    return any(a == "*" or a == name or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _same_origin(origin: str, host: Optional[tuple[str, Optional[int]]], scheme: str) -> bool:
    if host is None or origin == "null":  # "null": a sandboxed frame, a file: page, a redirect chain
        return False
    try:
        o = urlsplit(origin)
        o_name, o_port = _bare(o.hostname or ""), o.port or DEFAULT_PORTS.get(o.scheme)
    except ValueError:
        return False
    return (o_name, o_port) == (host[0], host[1] or DEFAULT_PORTS.get(scheme, 80))


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# ---------------------------------------------------------------- CORS

EXPOSED = b"X-Picochat-Dropped-Messages"
PREFLIGHT = ((b"access-control-allow-methods", b"GET, POST, PATCH, DELETE"),
             (b"access-control-max-age", b"600"), (b"content-length", b"0"))
# what a preflight may ask to send: the SDKs' own headers too (openai-node adds x-stainless-*); a key is
# still required on the request itself
REQUEST_HEADER = re.compile(r"[A-Za-z0-9-]{1,64}")


def normalize_origin(origin: str, strict: bool = True) -> str:
    """scheme://host[:port], lowercased, no path (what a browser sends as Origin). strict: refuse anything
    else (a --cors-origin mistake), else return it as it is (an Origin header that matches nothing)."""
    o = origin.strip().lower().rstrip("/")
    try:
        parts = urlsplit(o)
        _ = parts.port  # (a bad port raises)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not (
            parts.path or parts.query or parts.fragment or parts.username)
    except ValueError:
        ok = False
    if not ok and strict:
        raise PicochatError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port], such as "
                            "https://app.example.org or http://localhost:5173 ('*' is not accepted: it would let "
                            "every site's pages use this server)")
    return o


async def _preflight(send, requested: str) -> None:
    """A CORS preflight from a --cors-origin: 204 with what may follow (send adds the origin headers)."""
    names = [h.strip() for h in requested.split(",") if h.strip()][:32]
    allowed = ", ".join(["Authorization", "Content-Type"] + [h for h in names if REQUEST_HEADER.fullmatch(h)])
    await send({"type": "http.response.start", "status": 204,
                "headers": [*PREFLIGHT, (b"access-control-allow-headers", allowed.encode("latin-1"))]})
    await send({"type": "http.response.body", "body": b""})


# ---------------------------------------------------------------- the middleware

class GuardMiddleware:
    """See the module docstring. allowed_hosts None: no Host check (an app embedded in tests or
    behind something that checks it); keys {}: no auth, principal None."""

    def __init__(self, app, keys: Mapping[str, str], max_body: int, counters: dict,
                 allowed_hosts: Optional[Iterable[str]] = None, cors_origins: Iterable[str] = ()):
        self.app, self.max_body, self.counters = app, max_body, counters
        self.cors = frozenset(normalize_origin(o) for o in cors_origins)
        self.keys = [(name, key.encode("ascii")) for name, key in keys.items()]
        self.allowed = None if allowed_hosts is None else [normalize_allowed(a) for a in allowed_hosts]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": None}
        headers = {}
        for k, v in scope.get("headers") or ():
            headers.setdefault(k.lower(), v.decode("latin-1"))
        origin = headers.get(b"origin")
        cors = origin is not None and normalize_origin(origin, strict=False) in self.cors
        # Vary: Origin on every answer when CORS is on: a cache must not serve one origin's answer to another
        extra = SECURITY_HEADERS + ((b"vary", b"Origin"),) if self.cors else SECURITY_HEADERS
        if cors:
            extra += ((b"access-control-allow-origin", origin.encode("latin-1")),
                      (b"access-control-expose-headers", EXPOSED))

        async def guarded_send(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                have = {k.lower() for k, _ in msg.get("headers") or ()}
                msg = dict(msg, headers=[*(msg.get("headers") or ()),
                                         *((k, v) for k, v in extra if k not in have)])
            await send(msg)

        try:
            if cors and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
                return await _preflight(guarded_send, headers.get(b"access-control-request-headers", ""))
            refusal = self._check_request(scope, headers, cors)
            if refusal is None:
                app_receive = await self._read_body(headers, receive)
                if app_receive is None:
                    return  # the client went away mid-body: nobody to answer
                if not isinstance(app_receive, ApiError):
                    return await self.app(scope, app_receive, guarded_send)
                refusal = app_receive
            await refusal.response()(scope, receive, guarded_send)
        except Exception:
            status["code"] = status["code"] or 500  # uvicorn answers 500 for us
            raise
        finally:
            if status["code"] is not None:
                key = str(status["code"])
                self.counters[key] = self.counters.get(key, 0) + 1

    def _check_request(self, scope, headers: dict, cors: bool = False) -> Optional[ApiError]:
        """The refusal for this request's headers, or None (and request.state is filled in)."""
        host_header = headers.get(b"host")
        host = split_host(host_header) if host_header else None
        if self.allowed is not None and (host is None or not host_allowed(host[0], self.allowed)):
            shown = (host_header or "")[:100]
            return ApiError(400, f"this server does not answer to the Host {shown!r} (a guard against DNS "
                         "rebinding); if that is a name it really has, start it with --allowed-hosts "
                         f"{host[0] if host else 'NAME'}", code="invalid_host")
        if scope["method"] in UNSAFE_METHODS and not cors:
            site = headers.get(b"sec-fetch-site", "").lower()
            origin = headers.get(b"origin")
            if site in ("cross-site", "same-site") or (
                    origin is not None and not _same_origin(origin, host, scope.get("scheme", "http"))):
                return ApiError(403, "cross-site request refused: state-changing requests must come from this "
                             "server's own page or from a client that is not a browser", code="cross_site_request")
        if scope["method"] in UNSAFE_METHODS:
            ctype = headers.get(b"content-type")
            has_body = headers.get(b"content-length", "0").strip() != "0" or b"transfer-encoding" in headers
            if (ctype is not None and not _is_json(ctype)) or (ctype is None and has_body):
                return ApiError(415, f"request bodies are JSON: send 'Content-Type: application/json' (got "
                             f"{(ctype or 'none')[:100]!r})", code="unsupported_media_type")

        principal = None
        scheme, _, token = headers.get(b"authorization", "").partition(" ")
        if self.keys and scheme.lower() == "bearer":
            token_bytes = token.strip().encode("latin-1")
            for name, key in self.keys:  # every key is compared, so timing does not tell which one matched
                if hmac.compare_digest(token_bytes, key):
                    principal = name
        path = scope["path"]
        if self.keys and principal is None and path not in OPEN_PATHS and not path.startswith("/static/"):
            return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["client"] = principal if principal is not None else (scope.get("client") or (None,))[0]
        return None

    async def _read_body(self, headers: dict, receive):
        """A receive replaying the body read here, bounded by max_body whatever the headers announced;
        an ApiError; or None when the client disconnected."""
        length = headers.get(b"content-length")
        if length is not None and b"transfer-encoding" in headers:
            # two framings: a proxy and this server could disagree on where the body ends (smuggling)
            return ApiError(400, "a request with both Content-Length and Transfer-Encoding is ambiguous; "
                            "send one of them", code="invalid_body_framing")
        if length is not None and not length.strip().isdigit():
            return ApiError(400, f"bad Content-Length header {length[:40]!r}", code="invalid_body_framing")
        too_large = ApiError(413, f"the request body is larger than {self.max_body} bytes",
                             code="request_too_large")
        if length is not None and int(length) > self.max_body:
            return too_large
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return too_large
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: only http.disconnect, which streaming answers wait for
        return replay
