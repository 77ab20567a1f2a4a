"""`GET /api/messages/{id}/attention`: the attention maps of a stored answer (docs/api.md).

The tokens are rebuilt from the store: the conversation's path from its root to the answer, rendered
with the chat template as the server rendered it for generation (system prompt, generation prompt,
truncate_history's dropped turns), then the answer's text encoded. The stored `prompt_tokens` tells
which of the few possible renderings the model really read (the page trims the system prompt, an API
client may send it raw; a web conversation keeps the turns truncate_history left out): the first one of
that length wins, and `exact` says whether one matched.

A picture in the conversation is read as generation read it: its N <|image|> markers in the prompt, its
stored bytes decoded and encoded by the model's image encoder, the N embeddings placed at the markers
(GPT.forward's embeds). Its tokens are named "<image1:r0c2>" (picture 1, row 0, column 2), and the
response's `pictures` say where each picture's tokens sit, its sqrt(N) x sqrt(N) grid and its stored id
and URL, so the page can draw a token's attention over the picture.

All torch work runs on the model's own thread (Scheduler.run_on_model, between two decode turns); the
handler is a plain `def`, so waiting for it and encoding the JSON happen in FastAPI's thread pool and
never block the event loop that streams tokens to other clients.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import NamedTuple, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..inspect.maps import MAX_TOKENS
from .errors import ApiError, bad_request
from .store import Store
from .store_api import _mid
from .store_rules import Invalid

MAX_NUMBERS = 4_000_000   # weights in one response (about 25 MB of JSON); above it, ask for one layer
MAX_AT_ONCE = 4           # map computations waiting or running at once (each holds L x H x T^2 floats)
JOB_TIMEOUT_S = 300.0


def _system_candidates(system: Optional[str]) -> list[Optional[str]]:
    """What the model may have read as the system prompt: the page sends it trimmed (and none when
    blank), an API client exactly as typed (an empty one included)."""
    if system is None:
        return [None]
    out: list[Optional[str]] = []
    for s in (system.strip() or None, system):
        if s not in out:
            out.append(s)
    return out


class Rebuilt(NamedTuple):
    prompt: list[int]
    answer: list[int]
    exact: bool         # a rendering had the stored prompt_tokens' length (False: none did, or none was stored)
    images: list[dict]  # the pictures the prompt holds, in order: the store's image dicts, with message_id


def _content(m: dict):
    """A stored message's content for the chat template: its text, or text and image parts in the order the
    request had them (images.content_with_pictures: adjacent texts joined, empty ones left out)."""
    images, text = m.get("images") or [], m["content"]
    if not images:
        return text
    parts, at = [], 0
    for im in images:
        if im["offset"] > at:
            parts.append({"type": "text", "text": text[at:im["offset"]]})
        parts.append({"type": "image", "stored": im | {"message_id": m["id"]}})
        at = im["offset"]
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts


def rebuild_tokens(store: Store, host, msg: dict) -> Rebuilt:
    """A stored assistant message's prompt and answer ids as its model read and wrote them (a picture as
    its N <|image|> markers; `images` says which picture each run of them is)."""
    from ..chat_template import render_conversation
    path = store.path_to(msg["conversation_id"], msg["id"])
    if host.vision is None and any(m.get("images") for m in path):
        raise bad_request(f"message {msg['id']} answers a conversation with pictures, but {host.id!r} is a "
                          "text-only model, so its maps cannot show what it read: the answer was not generated "
                          "by it from these messages", "message_id")
    turns = [{"role": m["role"], "content": _content(m)} for m in path[:-1] if m["role"] != "system"]
    settings = msg.get("settings") or {}
    system = settings.get("system_prompt")
    if not isinstance(system, str):  # the recorder keeps it there only when it differed from the conversation's
        system = store.conversation(msg["conversation_id"])["system_prompt"]
    dropped = settings.get("dropped_messages")
    turn_options = [turns]
    if isinstance(dropped, int) and 0 < dropped < len(turns):  # a web conversation stores the dropped turns
        turn_options.insert(0, turns[dropped:])
    want = msg.get("prompt_tokens")
    first = None
    for kept in turn_options:
        images = [p["stored"] for t in kept if isinstance(t["content"], list) for p in t["content"]
                  if p["type"] == "image"]
        for s in _system_candidates(system):
            msgs = ([{"role": "system", "content": s}] if s is not None else []) + kept
            ids = render_conversation(msgs, host.tokenizer, host.template, add_generation_prompt=True,
                                      default_system=host.default_system, image_tokens=host.image_tokens)[0]
            if want is None or len(ids) == want:
                return Rebuilt(ids, host.tokenizer.encode(msg["content"]), want is not None, images)
            first = first or (ids, images)
    return Rebuilt(first[0], host.tokenizer.encode(msg["content"]), False, first[1])


def attention_router(store: Store) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["attention"])
    slots = threading.BoundedSemaphore(MAX_AT_ONCE)

    def answer_and_host(message_id: str, request: Request, what: str):
        mid = _mid(message_id)
        msg = store.get_message(mid)
        if msg["role"] != "assistant":
            raise Invalid(f"only an assistant answer has {what}; message {mid} is a {msg['role']} message",
                          "message_id")
        hosts = request.app.state.hosts
        host = hosts.get(msg["model"]) if msg["model"] else None
        if host is None:
            raise bad_request(f"message {mid} was written by {msg['model']!r}, which is not loaded here; "
                              f"loaded models: {', '.join(hosts)}", "message_id")
        if host.template is None:
            raise bad_request(f"model {host.id!r} has no chat template, so a chat answer cannot be rebuilt "
                              "for it", "message_id")
        if (msg.get("prompt_tokens") or 0) > MAX_TOKENS:  # refused before rendering a long conversation
            raise _too_long(mid, msg["prompt_tokens"])
        return mid, msg, host

    @r.get("/messages/{message_id}/tokens")
    def message_tokens(message_id: str, request: Request,
                       top: int = Query(5, ge=0, le=20, description="alternatives per token")):
        """Each answer token's probability and the likeliest alternatives, as the model gives them reading
        the conversation and the answer so far (temperature 1, no penalties: the model's own view, which
        the sampling knobs of the request then reshaped)."""
        mid, msg, host = answer_and_host(message_id, request, "token probabilities")
        prompt, answer, exact, images = rebuild_tokens(store, host, msg)
        ids = prompt + answer
        if len(ids) > min(MAX_TOKENS, host.model.config.block_size) or not answer:
            raise bad_request(f"message {mid} is empty or too long to score ({len(ids)} tokens with its "
                              "conversation)", "message_id")
        if not slots.acquire(blocking=False):  # (the same few slots as the maps: each is a forward pass)
            raise ApiError(503, "the server is busy reading back other answers; try again shortly",
                           type="server_error", code="busy")
        try:
            pictures, pixels = _pictures(store, host, prompt, images) if images else ([], None)
            data = _on_model_thread(host, lambda: _token_probs(host, prompt, answer, top, pixels))
        finally:
            slots.release()
        return {"message_id": mid, "model": host.id, "exact": exact, "tokens": data}

    @r.get("/messages/{message_id}/attention")
    def message_attention(message_id: str, request: Request,
                          layer: Optional[int] = Query(None, ge=0, description="only this layer (0-based)")):
        mid, msg, host = answer_and_host(message_id, request, "attention maps")
        cfg = host.model.config
        n_layers, n_heads = cfg.n_layer, cfg.n_head
        if layer is not None and layer >= n_layers:
            raise bad_request(f"layer must be in 0..{n_layers - 1} ({host.id} has {n_layers} layers), got {layer}",
                              "layer")
        prompt, answer, exact, images = rebuild_tokens(store, host, msg)
        ids = prompt + answer
        if len(ids) > MAX_TOKENS:
            raise _too_long(mid, len(ids))
        if len(ids) > cfg.block_size:
            raise bad_request(f"message {mid} and the conversation before it are {len(ids)} tokens, more than "
                              f"{host.id} reads at once ({cfg.block_size})", "message_id")
        numbers = (1 if layer is not None else n_layers) * n_heads * len(ids) ** 2
        if numbers > MAX_NUMBERS:
            raise bad_request(f"the maps of all {n_layers} layers of message {mid} are {numbers:,} numbers (at most "
                              f"{MAX_NUMBERS:,} in one response): ask for one layer at a time, ?layer=0 to "
                              f"{n_layers - 1}", "layer")
        if not slots.acquire(blocking=False):
            raise ApiError(503, "the server is busy drawing other attention maps; try again shortly",
                           type="server_error", code="busy")
        try:
            pictures, pixels = _pictures(store, host, prompt, images) if images else ([], None)
            data = _maps_on_model_thread(host, prompt, ids, layer, f"{host.id}, answer {mid}: {len(prompt)} tokens "
                                                                   f"read, {len(answer)} written", pictures, pixels)
        finally:
            slots.release()
        data.update({"message_id": mid, "conversation_id": msg["conversation_id"], "model": host.id,
                     "answer_start": len(prompt), "tokens": len(ids), "prompt_tokens": len(prompt),
                     "exact": exact, "layer": layer, "n_layers": n_layers, "n_heads": n_heads})
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return Response(body, media_type="application/json")

    return r


def _too_long(mid: int, n: int) -> ApiError:
    return bad_request(f"message {mid} and the conversation before it are {n} tokens; attention maps are drawn for "
                       f"at most {MAX_TOKENS} (a map is layers x heads x tokens^2 numbers)", "message_id")


def _pictures(store: Store, host, prompt: list[int], images: list[dict]):
    """(the response's pictures, their (M, 3, S, S) pixels): where each picture's tokens sit in the prompt
    and which stored picture it is, decoded as the server decoded it for generation (images.check_picture,
    at the model's size; a picture seen since is not decoded again)."""
    import torch

    from ..inspect.maps import picture_runs
    from .images import check_picture
    runs = picture_runs(prompt, host.image_id, host.image_tokens)
    if len(runs) != len(images):  # cannot happen for a prompt rendered from these messages
        raise ApiError(500, f"the rebuilt prompt holds {len(runs)} pictures but the conversation {len(images)}",
                       type="server_error")
    pixels = []
    for run, im in zip(runs, images):
        run.update(image_id=im["id"], url=f"/api/images/{im['id']}", message_id=im["message_id"],
                   media_type=im["media_type"], width=im["width"], height=im["height"])
        pixels.append(check_picture(store.image(im["id"])["data"], f"image {im['id']}", host.image_size).pixels)
    return runs, torch.stack(pixels)


def _token_probs(host, prompt: list[int], answer: list[int], top: int, pixels) -> list[dict]:
    """(On the model's thread.) One forward pass over prompt + answer: log softmax at each answer token."""
    import torch
    ids = prompt + answer
    extra = {}
    if pixels is not None:
        from ..checkpoints.vlm import encode_pixels
        from ..engine.engine import PromptEmbeds
        extra = PromptEmbeds.at_markers(prompt, host.image_id, encode_pixels(host.vision, pixels)).window(0, len(ids))
    with torch.no_grad():  # the LM head on the answer's positions only: a long prompt's V-wide logits are MBs
        h = host.model(torch.tensor([ids]), return_hidden=True, **extra)[0, len(prompt) - 1:len(ids) - 1]  # (A, d)
        logits = host.model.lm_head(h).float()  # (A, V)
    lp = torch.log_softmax(logits, -1)
    chosen = lp.gather(-1, torch.tensor(answer).view(-1, 1)).squeeze(-1).tolist()
    vals, alts = torch.topk(lp, top, -1) if top else (torch.zeros(len(answer), 0), torch.zeros(len(answer), 0))
    name = lambda t: host.tokenizer.token_bytes(int(t)).decode("utf-8", errors="replace")  # noqa: E731
    return [{"token": name(t), "bytes": list(host.tokenizer.token_bytes(int(t))), "logprob": round(c, 5),
             "top": [{"token": name(a), "logprob": round(v, 5)} for a, v in zip(ra, rv)]}
            for t, c, ra, rv in zip(answer, chosen, alts.tolist(), vals.tolist())]


def _on_model_thread(host, job):
    fut = host.scheduler.run_on_model(job)
    try:
        return fut.result(timeout=JOB_TIMEOUT_S)
    except FutureTimeout:
        fut.cancel()
        raise ApiError(503, f"the model stayed busy for {JOB_TIMEOUT_S:.0f} s; try again later", type="server_error",
                       code="timeout") from None


def _maps_on_model_thread(host, prompt: list[int], ids: list[int], layer: Optional[int], title: str,
                          pictures: list[dict], pixels) -> dict:
    """The pictures' embeddings, gpt_maps and to_json on the model's thread (all torch work); the scheduler
    runs the job between two decode turns, whether it is idle or generating."""
    from ..inspect.maps import gpt_maps

    def job() -> dict:
        embeds = None
        if pixels is not None:  # placed at the markers as images.prompt_embeds placed them for generation
            from ..checkpoints.vlm import encode_pixels
            from ..engine.engine import PromptEmbeds
            embeds = PromptEmbeds.at_markers(prompt, host.image_id, encode_pixels(host.vision, pixels))
        view = gpt_maps(host.model, host.tokenizer, ids, title, embeds=embeds, pictures=pictures)
        if layer is not None:
            g = view.groups["self"]
            g.weights = g.weights[layer:layer + 1]
        return view.to_json()

    return _on_model_thread(host, job)
