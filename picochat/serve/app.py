"""`create_app`: the FastAPI app that puts the models, the conversation store and the web page together.

Cross-cutting rules: guard.py checks every request (Host, cross-site requests, API keys, body size)
and adds the security headers; here, OpenAI-shaped errors for everything that goes wrong, including
FastAPI's own validation errors and unknown routes.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PicochatError
from .errors import ApiError
from .guard import GuardMiddleware, as_keys, normalize_allowed, normalize_origin

STATIC = Path(__file__).parent / "static"

WEB_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": None, "min_p": None, "repetition_penalty": 1.1,
                "max_tokens": 512, "seed": None}


def _error(status: int, message: str, param=None, type="invalid_request_error", code=None, headers=None):
    return ApiError(status, message, param, type, code).response(headers)


def create_app(hosts: list, store=None, api_key: Union[None, str, Mapping[str, str]] = None,
               max_body: int = 4 * 1024 * 1024, default_max_tokens: int = 1024,
               allowed_hosts: Optional[Iterable[str]] = None, encoders: Iterable = (),
               cors_origins: Iterable[str] = ()) -> FastAPI:
    """hosts: loaded ModelHosts (the first is the default model); store: a Store or None (no history).
    encoders: loaded encoder.embeddings.Encoders, answering /v1/embeddings.

    api_key: None (no auth), one key (principal 'key1') or {principal name: key}.
    allowed_hosts: the Host names answered (any port; '*' any, '*.domain' its subdomains). None means
    no Host check, for tests (TestClient sends Host 'testserver') and embedding; `picochat serve`
    always passes the list guard.allowed_hosts_for() computes from its bind address.
    """
    if not hosts:
        raise PicochatError("the server needs at least one model")
    keys = as_keys(api_key)
    if allowed_hosts is not None:  # checked now, not at the first request
        allowed_hosts = [normalize_allowed(a) for a in allowed_hosts]

    @asynccontextmanager
    async def lifespan(app):
        for h in hosts:
            h.scheduler.start()
        yield
        for h in hosts:
            h.scheduler.stop()

    # no /docs or /redoc: Swagger UI and ReDoc come from a CDN at a floating version, and would run
    # in the origin that holds the API key; /openapi.json stays for tools
    app = FastAPI(title="picochat", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API, conversation store and web page of picochat. See docs/api.md.")
    app.state.hosts = {h.id: h for h in hosts}
    app.state.encoders = {e.name: e for e in encoders}
    clash = set(app.state.hosts) & set(app.state.encoders)
    if clash:
        raise PicochatError(f"a chat model and an encoder are both called {sorted(clash)[0]!r}")
    app.state.store = store
    app.state.default_max_tokens = default_max_tokens
    app.state.started = time.time()
    app.state.allowed_hosts = allowed_hosts
    counters: dict = {}
    app.add_middleware(GuardMiddleware, keys=keys, max_body=max_body, counters=counters,
                       allowed_hosts=allowed_hosts, cors_origins=[normalize_origin(o) for o in cors_origins])

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response({"Retry-After": "1"} if e.status in (429, 503) else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        loc, msg = _first_error(e.errors())
        param = ".".join(loc) or None
        return _error(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(PicochatError)
    async def picochat_error(request, e: PicochatError):
        return _error(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):  # a bug: still an OpenAI-shaped answer, never a bare 500 page
        return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    from .embeddings_api import router as embeddings_router
    from .openai_api import router
    from .responses_api import router as responses_router
    from .tokenize_api import router as tokenize_router
    app.include_router(router)
    app.include_router(embeddings_router)
    app.include_router(tokenize_router)
    app.include_router(responses_router)
    if store is not None:
        from .attention_api import attention_router
        from .store_api import store_router
        app.include_router(store_router(store))
        app.include_router(attention_router(store))  # the maps of a stored answer: needs the store

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(app.state.hosts), "encoders": list(app.state.encoders), "uptime_s": round(time.time() - app.state.started, 1)}

    @app.head("/health", include_in_schema=False)
    async def health_head():  # load balancers and uptime checkers probe with HEAD
        return Response(status_code=200, media_type="application/json")

    @app.get("/api/config")
    async def config():
        return {"models": [{"id": h.id, "context_length": h.context, "chat": h.template is not None,
                            "vision": h.vision is not None} for h in hosts],
                "default_model": hosts[0].id, "auth": bool(keys),
                # a default answer length that leaves room for a conversation in a short context
                "defaults": WEB_DEFAULTS | {"max_tokens": min(WEB_DEFAULTS["max_tokens"], hosts[0].context // 4)},
                "store": store is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_prometheus(app, counters), media_type="text/plain; version=0.0.4")

    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    return app


def _first_error(errors: list) -> tuple[list[str], str]:
    """The one validation error to report, and its field path. A value that fits no branch of a union (a
    message's content: a string, or a list of parts) fails every branch; the deepest error is the one about
    what the client sent (a part's bad `detail`), not "should be a valid string". Pydantic's branch labels
    ("str", "list[...]") and a tagged union's tag (the part's type, repeated as the field's name) are left
    out of the path, so it reads messages.0.content.1.image_url.detail."""
    if not errors:
        return [], "invalid request"
    err = max(errors, key=lambda x: len(x.get("loc", ())))  # max keeps the first of equals
    loc: list[str] = []
    for x in err.get("loc", ()):
        x = str(x)
        if x in ("body", "query", "path", "str") or "[" in x or (loc and loc[-1] == x):
            continue
        loc.append(x)
    return loc, err.get("msg", "invalid request")


def _prometheus(app, counters: dict) -> str:
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    stats = {h.id: h.scheduler.stats() for h in app.state.hosts.values()}
    metric("picochat_http_requests_total", "counter", "HTTP requests answered, by status code",
           [({"code": c}, n) for c, n in sorted(counters.items())])
    metric("picochat_requests_total", "counter", "generation requests accepted by the scheduler",
           [({"model": m}, s["requests_total"]) for m, s in stats.items()])
    metric("picochat_generated_tokens_total", "counter", "tokens generated",
           [({"model": m}, s["generated_tokens_total"]) for m, s in stats.items()])
    metric("picochat_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
           [({"model": m}, round(s["tokens_per_second"], 3)) for m, s in stats.items()])
    metric("picochat_queue_depth", "gauge", "requests waiting for a batch slot",
           [({"model": m}, s["queue_depth"]) for m, s in stats.items()])
    metric("picochat_active_sequences", "gauge", "sequences in the running batch",
           [({"model": m}, s["active_sequences"]) for m, s in stats.items()])
    metric("picochat_compiled_decode", "gauge", "1 once decode steps run compiled (picochat serve --fast), else 0",
           [({"model": m}, s["compiled_decode"]) for m, s in stats.items()])
    return "\n".join(lines) + "\n"

