"""Load on `picochat serve`: concurrent streaming chat clients against SmolLM2, continuous batching at work.

Starts the server in a subprocess (the real CLI, a throwaway database), then for each concurrency level
C in --clients runs C clients for --duration seconds. Each client loops: send a streamed
/v1/chat/completions request (a different question each time, temperature 0.7, top_p 0.9,
max_tokens --max-tokens), read the SSE stream to `data: [DONE]`, repeat. A request counts only if its
stream ended with [DONE]; anything else (HTTP error, broken stream, missing [DONE]) is an error.

Reported per level: requests, errors, TTFT (time to the first content delta) p50/p95, aggregate
tokens/s (completion tokens from the final usage chunk / wall time of the level) and, the figure
continuous batching is for, the ratio of each level's tokens/s to one client's, measured in this run.
The whole thing runs once per decode path in --fast (a server each: `--fast plain`, the eager step, and
`--fast compile`, the compiled one, which the server compiles before it answers), and each level's
compiled/plain tokens/s ratio is reported.

    python benchmarks/serve_load.py                        # 1, 4, 16 clients x 30 s, both paths (~6 min)
    python benchmarks/serve_load.py --clients 16 --duration 10 --fast compile
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import emit, loadavg, log, machine

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Give me three tips for learning Python.",
             "Explain what a transformer model is in two sentences.", "Write a haiku about the sea.",
             "Why is the sky blue?", "How do I boil an egg?", "What is 12 times 7?",
             "Name five animals that live in the ocean.", "What does a compiler do?",
             "Suggest a name for a black cat.", "How far is the Moon from the Earth?",
             "What is photosynthesis?", "Tell me a fun fact about octopuses.", "What is a prime number?",
             "How do airplanes stay in the air?", "Recommend a good habit for mornings."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


async def client(url: str, k: int, stop_at: float, max_tokens: int, out: dict) -> None:
    i = k
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
        while time.monotonic() < stop_at:
            body = {"model": "smollm2", "stream": True, "temperature": 0.7, "top_p": 0.9, "max_tokens": max_tokens,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
            i += 1
            t0, ttft, done, tokens = time.monotonic(), None, False, 0
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        out["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            out["errors"].append(chunk["error"]["message"])
                            break
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                            ttft = time.monotonic() - t0
            except httpx.HTTPError as e:
                out["errors"].append(f"{type(e).__name__}: {e}")
                continue
            if not done:
                out["errors"].append("stream ended without [DONE]")
                continue
            out["requests"] += 1
            out["tokens"] += tokens
            if ttft is not None:
                out["ttft"].append(ttft)


async def level(url: str, clients: int, duration: float, max_tokens: int) -> dict:
    out = {"requests": 0, "tokens": 0, "ttft": [], "errors": []}
    t0 = time.monotonic()
    await asyncio.gather(*(client(url, k, t0 + duration, max_tokens, out) for k in range(clients)))
    wall = time.monotonic() - t0  # includes finishing the requests in flight at the deadline
    return {"clients": clients, "requests": out["requests"], "errors": len(out["errors"]),
            "error_samples": out["errors"][:3], "ttft_p50_s": pct(out["ttft"], 0.5),
            "ttft_p95_s": pct(out["ttft"], 0.95), "tokens_per_s": round(out["tokens"] / wall, 2),
            "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--serve-args", default="", help="extra arguments for picochat serve, e.g. '--dtype fp32'")
    ap.add_argument("--fast", nargs="+", default=["plain", "compile"], choices=["plain", "compile", "auto"],
                    help="decode paths, one server each (picochat serve --fast)")
    args = ap.parse_args()
    paths = {fast: run_server(args, fast) for fast in args.fast}
    result = {"benchmark": "serve_load", "model": args.model, "duration_s": args.duration,
              "max_tokens": args.max_tokens, "serve_args": args.serve_args, "paths": paths,
              "total_errors": sum(lv["errors"] for levels in paths.values() for lv in levels)}
    if "plain" in paths and "compile" in paths:
        result["compiled_over_plain"] = {str(a["clients"]): round(b["tokens_per_s"] / a["tokens_per_s"], 2)
                                         for a, b in zip(paths["plain"], paths["compile"]) if a["tokens_per_s"]}
    emit(result | {"loadavg": loadavg(), **machine()})


def run_server(args, fast: str) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "picochat.cli", "serve", args.model, "--port", str(port), "--fast", fast,
               "--db", str(Path(tmp) / "bench.db"), "--max-batch", str(max(args.clients)), *args.serve_args.split()]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log("starting:", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            t_start = time.monotonic()
            for _ in range(1200):  # (--fast compile: the server compiles before it answers, 1-4 min)
                if proc.poll() is not None:
                    sys.exit("server exited:\n" + proc.stdout.read().decode(errors="replace"))
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            log(f"[{fast}] server ready after {time.monotonic() - t_start:.0f} s")
            asyncio.run(level(url, 1, 3.0, 8))  # warm-up
            levels = []
            for c in args.clients:
                r = asyncio.run(level(url, c, args.duration, args.max_tokens))
                log(f"[{fast}] {json.dumps(r)}")
                levels.append(r)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = next((lv["tokens_per_s"] for lv in levels if lv["clients"] == 1), None)
    for lv in levels:
        lv["speedup_vs_1_client"] = round(lv["tokens_per_s"] / base, 2) if base else None
    return levels


if __name__ == "__main__":
    main()
