"""`picochat serve [MODEL ...]`: the chat app, an OpenAI-compatible API and the web page, in one process.

    picochat serve                      SmolLM2-135M-Instruct at http://127.0.0.1:8000
    picochat serve smollm2 runs/sft     two models; the first is the default, the page has a picker
    picochat serve smollm2 minilm       and an encoder answering POST /v1/embeddings
    curl localhost:8000/v1/chat/completions --json '{"messages": [{"role": "user", "content": "Hi"}]}'

API keys (one per user or tool; the name is the request's principal, e.g. for per-user caches):
    PICOCHAT_API_KEY='alice KEY1,bob KEY2' picochat serve      entries: KEY or NAME KEY, comma-separated
    picochat serve --api-key-file keys.txt                      one entry a line, # comments
    make a key: python -c 'import secrets; print(secrets.token_urlsafe(32))'
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


PICTURE_BODY_MB = 32.0  # the default body limit when a model sees: one 20 MB picture, base64, and the text


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    """Models to serve: smollm2, .gguf files or picochat checkpoints (the first is the default), and encoders
    for /v1/embeddings: minilm or a Hugging Face BERT folder."""
    host: str = "127.0.0.1"
    """Address to bind. Beyond loopback (0.0.0.0: every interface) it needs an API key, or --insecure-no-key."""
    port: int = 8000
    """TCP port."""
    db: Optional[str] = None
    """SQLite file for conversations and feedback (default: $PICOCHAT_HOME/picochat.db)."""
    store: bool = True
    """Keep conversations and feedback in the database (--no-store: keep no history at all)."""
    api_key: Optional[str] = None
    """Demand 'Authorization: Bearer KEY' on every route but /health and the page. KEY, or NAME KEY to name
    its user or tool (unnamed: key1, key2, ... by position); several separated by commas. Visible to anyone
    on this machine in `ps`: prefer $PICOCHAT_API_KEY (same format, used when neither --api-key nor
    --api-key-file is given) or --api-key-file."""
    api_key_file: Optional[str] = None
    """File of API keys, one a line: KEY or NAME KEY (NAME: letters, digits, . _ @ -); blank lines and
    lines starting with # are skipped. Adds to --api-key."""
    allowed_hosts: Optional[str] = None
    """Host names answered besides the bind address, comma-separated, any port ('*': any; '*.example.org':
    its subdomains). Guards against DNS rebinding; bound to 0.0.0.0 or :: the server answers loopback,
    this machine's hostname and addresses, so name here what clients or a reverse proxy use."""
    cors_origin: Optional[str] = None
    """Origins (scheme://host[:port], comma-separated) whose pages may call the API from the browser (CORS):
    for a web app served elsewhere, e.g. http://localhost:5173. Others stay refused as cross-site."""
    insecure_no_key: bool = False
    """Allow --host beyond loopback without an API key: anyone who can reach the port can use the server."""
    max_batch: int = 16
    """Sequences decoded together (continuous batching slots per model)."""
    max_queue: int = 64
    """Requests that may wait for a slot; more get a 503."""
    max_context: int = 4096
    """KV-cache positions per sequence (prompt + answer), at most the model's own context."""
    max_tokens: int = 1024
    """Default answer length limit when a request gives none."""
    max_request_tokens: int = 8192
    """Most tokens one request may ask for in all (n x max_tokens), so one client cannot book every slot."""
    dtype: str = "auto"
    """Chat models: auto (bf16 where the CPU/GPU is fast at it; with --quantize where picochat's int8/int4 VNNI
    kernels run, fp32 activations, which they take), fp32, bf16 or fp16. Encoders always run fp32 (their
    embeddings then equal `picochat embed`'s)."""
    quantize: Optional[Literal["int8", "int4"]] = None
    """Chat models: int8 or int4 weights (smaller, faster decoding on CPUs; inputs rounded to int8 on AVX-512 VNNI CPUs); encoders are not quantized."""
    fast: Literal["auto", "compile", "plain"] = "auto"
    """Decode step and prompts: auto = compiled by TorchInductor on CPUs (~2x faster tokens, prompt chunks 1.1-1.7x)
    before the server answers (2-3 min the first time, ~40 s once cached); compile = the same, an error if the
    decode step cannot; plain = never compile."""
    max_body_mb: Optional[float] = None
    """Largest request body accepted, in MB (default: 4, or 32 when a served model sees pictures: a 20 MB
    picture is 27 MB as a base64 data: URL)."""


def api_keys(cfg: ServeConfig) -> dict[str, str]:
    """{principal name: key} from --api-key and --api-key-file, else $PICOCHAT_API_KEY; {} for none."""
    from .guard import name_keys, parse_keys
    entries = []
    if cfg.api_key is not None:
        entries += parse_keys(cfg.api_key, "--api-key")
    if cfg.api_key_file:
        try:
            text = open(cfg.api_key_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise PicochatError(f"--api-key-file {cfg.api_key_file}: cannot read it ({e})") from None
        entries += parse_keys(text, f"--api-key-file {cfg.api_key_file}", lines=True)
    if cfg.api_key is None and not cfg.api_key_file:
        entries = parse_keys(os.environ.get("PICOCHAT_API_KEY", ""), "$PICOCHAT_API_KEY")
    elif not entries:  # e.g. --api-key "$KEY" with KEY unset: never quietly serve without a key
        raise PicochatError("--api-key / --api-key-file name no key; give one, or leave both out for no auth")
    return name_keys(entries)


def _allowed_extra(cfg: ServeConfig) -> list[str]:
    from .guard import normalize_allowed
    return [normalize_allowed(a) for a in (cfg.allowed_hosts or "").split(",") if a.strip()]


def _check(cfg: ServeConfig) -> dict[str, str]:
    """Refuse bad settings before anything loads; returns the API keys."""
    from .guard import is_loopback
    if not 0 < cfg.port < 65536:
        raise PicochatError(f"--port must be in 1..65535, got {cfg.port}")
    for name in ("max_batch", "max_queue", "max_context", "max_tokens", "max_request_tokens"):
        if getattr(cfg, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_batch > 256:
        raise PicochatError(f"--max-batch {cfg.max_batch} is absurd for one process; use at most 256")
    if cfg.max_body_mb is not None and cfg.max_body_mb <= 0:
        raise PicochatError("--max-body-mb must be positive")
    if not cfg.models:
        raise PicochatError("name at least one model (e.g. smollm2)")
    keys = api_keys(cfg)
    _allowed_extra(cfg)
    if not keys and not is_loopback(cfg.host) and not cfg.insecure_no_key:
        raise PicochatError(f"--host {cfg.host} lets other machines reach the server, which has no API key: set "
                            "PICOCHAT_API_KEY or --api-key-file (or pass --insecure-no-key if anyone who can "
                            "reach it may use it)")
    return keys


def build_app(cfg: ServeConfig):
    """The app for `cfg` (models loaded, store opened); what `serve` runs, usable from Python too."""
    from .app import create_app
    from .guard import allowed_hosts_for
    from .hosts import load_host
    from .guard import normalize_origin
    keys = _check(cfg)
    origins = [normalize_origin(o) for o in (cfg.cors_origin or "").split(",") if o.strip()]  # before loading
    from ..encoder.embeddings import is_encoder_spec, load_encoder
    hosts, encoders, seen = [], [], set()
    for spec in cfg.models:
        if is_encoder_spec(spec):
            e = load_encoder(spec)
            if e.name in seen:
                raise PicochatError(f"two models are both called {e.name!r}; serve them from differently named paths")
            seen.add(e.name)
            encoders.append(e)
            continue
        # --no-store: nothing of a request outlives it, its K/V cache included (no prompt caching across requests)
        h = load_host(spec, dtype=cfg.dtype, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                      max_context=cfg.max_context, quantize=cfg.quantize, fast=cfg.fast, retain_prefixes=cfg.store,
                      max_request_tokens=cfg.max_request_tokens)
        if h.id in seen:
            raise PicochatError(f"two models are both called {h.id!r}; serve them from differently named paths")
        seen.add(h.id)
        hosts.append(h)
    for h in hosts:  # before the first request: an answer must not wait for the compiler (engine/compiled.py)
        if h.scheduler.decoder is not None:
            print(f"compiling {h.id}'s decode and prefill steps (TorchInductor: 2-3 min the first time, ~40 s once "
                  "cached; --fast plain skips it)...", flush=True)
            t0 = time.monotonic()
            ok = h.scheduler.decoder.usable()
            print(f"  {'done' if ok else 'failed, the plain step it is'} in {time.monotonic() - t0:.0f} s", flush=True)
            if ok:  # and the step that reads prompts (engine/compiled.py's prefill_step)
                t0 = time.monotonic()
                ok = h.scheduler.decoder.start_prefill(wait=True).prefill_ready()
                print(f"  its prefill step: {'done' if ok else 'failed, prompts run eager'} in "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
    if not hosts:
        raise PicochatError(f"{', '.join(e.name for e in encoders)} only embed text; the server also needs a chat "
                            "model to start, e.g. picochat serve smollm2 minilm")
    store = None
    if cfg.store:
        from .store import Store, default_db_path
        store = Store(cfg.db or default_db_path())
    max_body_mb = cfg.max_body_mb or (PICTURE_BODY_MB if any(h.vision is not None for h in hosts) else 4.0)
    return create_app(hosts, store=store, api_key=keys or None, max_body=int(max_body_mb * 1024 * 1024),
                      default_max_tokens=cfg.max_tokens,
                      allowed_hosts=allowed_hosts_for(cfg.host, _allowed_extra(cfg)), encoders=encoders,
                      cors_origins=origins)


def _check_port(host: str, port: int) -> None:
    """Fail before loading models (which takes seconds) when the address is taken."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PicochatError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                                "(another server running? pick another --port)") from None


def serve(cfg: ServeConfig) -> int:
    import uvicorn
    from .guard import NEW_KEY, WILDCARD_ADDRESSES, is_loopback
    keys = _check(cfg)
    _check_port(cfg.host, cfg.port)
    if cfg.api_key is not None:
        print("note: --api-key is visible to anyone on this machine in `ps`; prefer PICOCHAT_API_KEY or "
              "--api-key-file", file=sys.stderr)
    for name, key in keys.items():
        if len(key) < 16:
            print(f"warning: the API key {name!r} has only {len(key)} characters, easy to guess; make one "
                  f"with: {NEW_KEY}", file=sys.stderr)
    if not keys and not is_loopback(cfg.host):
        print("warning: listening beyond this machine without an API key (--insecure-no-key): anyone who "
              "can reach it can use it", file=sys.stderr)
    app = build_app(cfg)
    hosts = [f"{h.id} (sees pictures)" if h.vision is not None else h.id for h in app.state.hosts.values()] + \
        [f"{e} (embeddings)" for e in app.state.encoders]
    wildcard = cfg.host in WILDCARD_ADDRESSES
    bound = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    where = f"http://{bound if not wildcard else 'localhost'}:{cfg.port}"
    print(f"picochat serve: {', '.join(hosts)} at {where}  (API: {where}/v1, schema: {where}/openapi.json; "
          "Ctrl-C stops)", flush=True)
    if wildcard:
        print(f"answering the Host names {', '.join(app.state.allowed_hosts)} (others: --allowed-hosts)",
              flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if app.state.store is not None:
            app.state.store.close()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="the chat app: OpenAI-compatible API + web page (default: SmolLM2)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(p, ServeConfig, positional=("models",))
    p.set_defaults(func=lambda args: serve(dataclass_from_args(ServeConfig, args)))
