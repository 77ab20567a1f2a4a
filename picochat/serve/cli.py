"""`picochat serve [MODEL ...]`: the chat app, an OpenAI-compatible API and the web page, in one process.

    picochat serve                      SmolLM2-135M-Instruct at http://127.0.0.1:8000
    picochat serve smollm2 runs/sft     two models; the first is the default, the page has a picker
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    """Models to serve: smollm2, .gguf files or picochat checkpoints; the first is the default."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network (set --api-key then)."""
    port: int = 8000
    """TCP port."""
    db: Optional[str] = None
    """SQLite file for conversations and feedback (default: $PICOCHAT_HOME/picochat.db)."""
    store: bool = True
    """Keep conversations and feedback in the database (--no-store: keep no history at all)."""
    api_key: Optional[str] = None
    """Demand 'Authorization: Bearer KEY' on every route but /health (default: $PICOCHAT_API_KEY)."""
    max_batch: int = 16
    """Sequences decoded together (continuous batching slots per model)."""
    max_queue: int = 64
    """Requests that may wait for a slot; more get a 503."""
    max_context: int = 4096
    """KV-cache positions per sequence (prompt + answer), at most the model's own context."""
    max_tokens: int = 1024
    """Default answer length limit when a request gives none."""
    dtype: str = "auto"
    """auto (bf16 where the CPU/GPU is fast at it), fp32, bf16 or fp16."""
    quantize: Optional[str] = None
    """int8: weight-only int8 matmuls (smaller, faster decoding on CPUs)."""
    max_body_mb: float = 4.0
    """Largest request body accepted, in MB."""


def _check(cfg: ServeConfig) -> None:
    if not 0 < cfg.port < 65536:
        raise PicochatError(f"--port must be in 1..65535, got {cfg.port}")
    for name in ("max_batch", "max_queue", "max_context", "max_tokens"):
        if getattr(cfg, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_batch > 256:
        raise PicochatError(f"--max-batch {cfg.max_batch} is absurd for one process; use at most 256")
    if cfg.max_body_mb <= 0:
        raise PicochatError("--max-body-mb must be positive")
    if not cfg.models:
        raise PicochatError("name at least one model (e.g. smollm2)")


def build_app(cfg: ServeConfig):
    """The app for `cfg` (models loaded, store opened); what `serve` runs, usable from Python too."""
    from .app import create_app
    from .hosts import load_host
    _check(cfg)
    hosts, seen = [], set()
    for spec in cfg.models:
        h = load_host(spec, dtype=cfg.dtype, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                      max_context=cfg.max_context, quantize=cfg.quantize)
        if h.id in seen:
            raise PicochatError(f"two models are both called {h.id!r}; serve them from differently named paths")
        seen.add(h.id)
        hosts.append(h)
    store = None
    if cfg.store:
        from .store import Store, default_db_path
        store = Store(cfg.db or default_db_path())
    key = cfg.api_key or os.environ.get("PICOCHAT_API_KEY") or None
    return create_app(hosts, store=store, api_key=key, max_body=int(cfg.max_body_mb * 1024 * 1024),
                      default_max_tokens=cfg.max_tokens)


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
    _check(cfg)
    _check_port(cfg.host, cfg.port)
    app = build_app(cfg)
    hosts = list(app.state.hosts)
    where = f"http://{cfg.host if cfg.host not in ('0.0.0.0', '::') else 'localhost'}:{cfg.port}"
    print(f"picochat serve: {', '.join(hosts)} at {where}  (API: {where}/v1, docs: {where}/docs; Ctrl-C stops)",
          flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("PICOCHAT_API_KEY")):
        print("warning: listening beyond this machine without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
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
