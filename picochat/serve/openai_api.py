"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (/v1/embeddings: embeddings_api.py).

A request becomes n scheduler requests (one per choice), queued all together or not at all, under
its client's name (fair sharing) and its cache scope: prompt caching is per API key and, when the
request names one, per conversation, so no client learns from cached_tokens (or from the time to the
first token) what another client's prompt said. Their events arrive from the model thread
through `loop.call_soon_threadsafe` onto one asyncio queue; a client that goes away cancels them, which
frees their batch slots at the next decode step.

Everything that costs CPU in proportion to the request (rendering and tokenizing up to 4 MB of text,
decoding pictures) runs in a worker thread: the event loop keeps streaming the other clients' tokens
meanwhile. Pictures (images.py) become embeddings on the model's thread, placed at their <|image|> tokens.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.engine import SamplingParams
from ..engine.scheduler import Event, QueueFull
from ..engine.scheduler import Request as GenRequest
from ..errors import PicochatError
from .errors import ApiError, bad_request
from .logprobs import Pending, chat_logprobs, completion_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest, Sampling
from .chat_prepare import _host, _params, prepare_chat
from .recorder import Recorder
from . import tools


def _settings(body: Sampling, sp: SamplingParams) -> dict:
    return {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                                           "n", "stop") if getattr(body, k) not in (None, [])} | \
        {"max_tokens": sp.max_tokens}


def _principal(request: Request) -> Optional[str]:
    """The API key's name (set by the guard middleware), or None on a key-less server."""
    return getattr(request.state, "principal", None)


def _client(request: Request) -> Optional[str]:
    """Who is asking, for fair sharing: the key's name, else the client's address."""
    return getattr(request.state, "client", None) or (request.client.host if request.client else None)


async def _generate(request: Request, host, prompt: list[int], sp: SamplingParams, n: int,
                    state: list[dict], conversation: Optional[str] = None,
                    embeds=None) -> AsyncIterator[tuple[int, Event]]:
    """Run n choices; yields (choice index, event). `state[i]` collects text, tokens and finish reason."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    reqs = []
    client, scope = _client(request), (_principal(request), conversation)
    for i in range(n):
        p = SamplingParams(**{**sp.__dict__, "seed": None if sp.seed is None else sp.seed + i})
        reqs.append(GenRequest(prompt, p, lambda ev, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)),
                               client=client, cache_scope=scope, embeds=embeds))
    try:
        host.scheduler.submit_many(reqs)
    except QueueFull as e:
        for r in reqs:
            host.scheduler.cancel(r)
        raise ApiError(503, f"the server is busy: {e}", type="server_error", code="queue_full") from None
    except PicochatError as e:
        for r in reqs:
            host.scheduler.cancel(r)
        raise bad_request(str(e), "messages") from None
    state[0]["submitted"] = True  # from here on the request is real: it gets stored
    for s in state:
        s["submitted_at"] = time.monotonic()
        s["logprobs"] = [] if sp.logprobs is not None else None
    open_, checked = n, time.monotonic()
    try:
        while open_:
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                ev = None
            # a client that hung up frees its slots now, not at max_tokens (checked twice a second,
            # also while tokens flow: a non-streamed request gets no other signal)
            if time.monotonic() - checked > 0.5 or ev is None:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if ev is None:
                continue
            s = state[i]
            s["text"] += ev.text
            s["tokens"] += len(ev.token_ids)
            if ev.token_ids and "first_at" not in s:
                s["first_at"] = time.monotonic()
            if sp.logprobs is not None:
                s["logprobs"] += ev.logprobs
            s["prompt_tokens"] = ev.prompt_tokens
            s["cached"] = ev.cached_tokens
            if ev.finish_reason:
                s["done_at"] = time.monotonic()
                s["finish_reason"] = ev.finish_reason
                s["error"] = ev.error
                open_ -= 1
            yield i, ev
    finally:
        for r in reqs:  # no-op for finished ones; frees the slots of a client that went away
            host.scheduler.cancel(r)


def _new_state(n: int) -> list[dict]:
    return [{"text": "", "tokens": 0, "prompt_tokens": 0, "cached": 0, "finish_reason": None, "error": None,
             "logprobs": None} for _ in range(n)]


def timing(s: dict) -> Optional[dict]:
    """A choice's time to its first token (from submission: queueing and prefill included) and its decode
    speed after it, as the page shows them under an answer."""
    if "first_at" not in s or "done_at" not in s:
        return None
    out = {"ttft_s": round(s["first_at"] - s["submitted_at"], 3)}
    if s["tokens"] > 1 and s["done_at"] > s["first_at"]:
        out["tokens_per_s"] = round((s["tokens"] - 1) / (s["done_at"] - s["first_at"]), 2)
    return out


def _usage(state: list[dict], prompt_len: int) -> dict:
    done = sum(s["tokens"] for s in state)
    return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done,
            "prompt_tokens_details": {"cached_tokens": max(s["cached"] for s in state)}}


# Line breaks to Python's str.splitlines (which httpx's iter_lines uses) that JSON leaves raw: a generated
# token holding one would cut an event in two for such clients. Inside a JSON string their escape is exact.
_SPLITTERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':')).translate(_SPLITTERS)}\n\n"


def _check_error(state: list[dict]) -> None:
    errors = [s["error"] for s in state if s["finish_reason"] == "error"]
    if errors:
        raise ApiError(500, f"generation failed: {errors[0]}", type="server_error")
    gone = [s["error"] for s in state if s["finish_reason"] == "cancelled" and s["error"]]
    if gone:  # the server is shutting down
        raise ApiError(503, gone[0], type="server_error", code="shutting_down")


router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [h.card() for h in state.hosts.values()] +
            [encoder_card(e, state.started) for e in state.encoders.values()]}


def encoder_card(enc, created: float) -> dict:
    return {"id": enc.name, "object": "model", "created": int(created), "owned_by": "picochat",
            "type": "embedding", "dimensions": enc.dim, "context_length": enc.max_tokens, "chat": False}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    app = request.app
    job = await prepare_chat(body, request)
    host, messages, kept, ids, sp, embeds, tool_mode = (job.host, job.messages, job.kept, job.ids, job.sp, job.embeds,
                                                        job.tool_mode)
    headers = {"X-Picochat-Dropped-Messages": str(len(messages) - len(kept))}
    store = app.state.store
    saver = None
    if body.store is False and "conversation_id" in (body.metadata or {}):
        raise bad_request("store: false, but metadata names a stored conversation to answer in", "store")
    if store is not None and body.store is not False:
        saver = await Recorder.create(store, body, messages, kept, host, _settings(body, sp))
    # prompt caching is scoped to the conversation the page names, or to the client's prompt_cache_key
    conversation = saver.conversation_id if saver and saver.conversation_id else body.prompt_cache_key
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    state = _new_state(body.n)

    if not body.stream:
        try:
            async for _ in _generate(request, host, ids, sp, body.n, state, conversation, embeds):
                pass
        finally:
            if saver:
                await asyncio.to_thread(saver.save, state)
        _check_error(state)
        choices = []
        for i, s in enumerate(state):
            message, finish = tools.chat_message(s["text"], s["finish_reason"], tool_mode)
            choices.append({"index": i, "message": message, "logprobs": chat_logprobs(host.tokenizer, s["logprobs"]),
                            "finish_reason": finish})
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": host.id,
                             "choices": choices,
                             "usage": _usage(state, len(ids)), "system_fingerprint": host.fingerprint},
                            headers=headers)

    envelope = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": host.id,
                "system_fingerprint": host.fingerprint}
    openers = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(body.n)]

    pending = Pending(body.n, sp.logprobs is not None)
    streams = [tools.ChatDeltas(tool_mode) for _ in range(body.n)]

    def choices(i, ev):  # the text (or tool-call pieces), then (in a chunk of its own) the finish reason
        deltas = streams[i].push(ev.text)
        lps = pending.take(i, ev.logprobs, bool(deltas or ev.finish_reason))
        if lps and not deltas:
            deltas = [{"content": ""}]
        for k, delta in enumerate(deltas):
            yield {"index": i, "delta": delta, "logprobs": chat_logprobs(host.tokenizer, lps) if k == 0 else None,
                   "finish_reason": None}
        if ev.finish_reason:
            yield {"index": i, "delta": {}, "logprobs": None, "finish_reason": streams[i].finish(ev.finish_reason)}
    # the answer is stored synchronously as the stream closes: after a disconnect this task may not
    # get to await again
    return await _stream(request, host, ids, sp, body, state, envelope, openers, choices, headers,
                         on_close=saver.save if saver else None, conversation=conversation, embeds=embeds)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    app = request.app
    host = _host(app, body.model)
    eot = host.tokenizer.special_tokens.get("<|endoftext|>")
    if isinstance(body.prompt, list):
        V = host.tokenizer.vocab_size
        if not body.prompt or any(not 0 <= t < V for t in body.prompt):
            raise bad_request(f"prompt token ids must be in [0, {V})", "prompt")
        ids = list(body.prompt)
    else:
        ids = await asyncio.to_thread(host.tokenizer.encode, body.prompt)
        if not ids:  # an empty prompt continues from the start-of-document token
            if eot is None:
                raise bad_request("the prompt is empty", "prompt")
            ids = [eot]
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs (the prompt's own logprobs) is not supported; ask for one or the "
                          "other", "echo")
    sp = _params(body, host, len(ids), app.state.default_max_tokens, (eot,) if eot is not None else (),
                 body.logprobs)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    state = _new_state(body.n)
    echo = await asyncio.to_thread(host.tokenizer.decode, ids) if body.echo else ""
    if not body.stream:
        async for _ in _generate(request, host, ids, sp, body.n, state):
            pass
        _check_error(state)
        return {"id": cid, "object": "text_completion", "created": created, "model": host.id,
                "choices": [{"index": i, "text": echo + s["text"],
                             "logprobs": completion_logprobs(host.tokenizer, s["logprobs"]),
                             "finish_reason": s["finish_reason"]} for i, s in enumerate(state)],
                "usage": _usage(state, len(ids)), "system_fingerprint": host.fingerprint}
    envelope = {"id": cid, "object": "text_completion", "created": created, "model": host.id,
                "system_fingerprint": host.fingerprint}
    openers = [{"index": i, "text": echo, "logprobs": None, "finish_reason": None} for i in range(body.n)] if echo else []

    pending = Pending(body.n, sp.logprobs is not None)

    def choices(i, ev):  # text and finish reason together, as OpenAI's completions stream them
        lps = pending.take(i, ev.logprobs, bool(ev.text or ev.finish_reason))
        if ev.text or ev.finish_reason:
            yield {"index": i, "text": ev.text, "finish_reason": ev.finish_reason,
                   "logprobs": completion_logprobs(host.tokenizer, lps, pending.offset[i])}
            pending.offset[i] += len(ev.text)
    return await _stream(request, host, ids, sp, body, state, envelope, openers, choices, {})


async def _stream(request, host, ids, sp, body, state, envelope, openers, choices, headers, on_close=None,
                  conversation=None, embeds=None):
    """The SSE response both endpoints share: opening chunks, one chunk per choice delta, an error event
    if generation failed, the usage chunk when asked for, then [DONE]."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    gen = _generate(request, host, ids, sp, body.n, state, conversation, embeds)
    first = await _first(gen)  # submit before answering 200, so a full queue is a real 503

    def chunk(choice_list, usage=None):
        return _sse({**envelope, "choices": choice_list, **({"usage": usage} if include_usage else {})})

    async def events():
        try:
            for c in openers:
                yield chunk([c])
            async for i, ev in _chain(first, gen):
                if ev.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                          "param": None, "code": None}})
                    continue
                for c in choices(i, ev):
                    yield chunk([c])
            if include_usage:
                yield chunk([], _usage(state, len(ids)))
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()
            if on_close:
                on_close(state)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


async def _first(gen):
    """Start the generator (which submits the requests) so submission errors become HTTP errors."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
        async for item in gen:
            yield item
