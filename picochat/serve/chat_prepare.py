"""What a chat request needs before it can generate, shared by /v1/chat/completions and /v1/responses: the
model it names, its messages rendered (tools folded in, the oldest turns dropped under truncate_history),
the sampling parameters (a 400 naming the field that cannot be honoured), a grammar for structured output
or tool calls, and the pictures' embeddings."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from fastapi import Request

from ..engine.engine import SamplingParams
from ..errors import PicochatError
from . import tools
from .errors import bad_request, not_found
from .images import cannot_see, prompt_embeds, request_messages
from .protocol import ChatCompletionRequest, Sampling
from .structured import response_grammar

def _host(app, name: Optional[str]):
    hosts = app.state.hosts
    if not name:
        return next(iter(hosts.values()))
    if name in app.state.encoders:
        raise bad_request(f"model {name!r} is an embedding model (POST /v1/embeddings) and cannot write text; "
                          f"models that can: {', '.join(hosts)}", "model")
    if name not in hosts:
        raise not_found(f"model {name!r} is not loaded here; GET /v1/models lists {', '.join(hosts)}", "model")
    return hosts[name]


def _params(body: Sampling, host, prompt_len: int, default_max: int, stops: tuple[int, ...],
            logprobs: Optional[int] = None) -> SamplingParams:
    """The engine's sampling parameters, or a 400 naming the field that cannot be honoured. (A temperature
    below sampling.GREEDY_BELOW is greedy decoding, as documented in docs/api.md.)"""
    bias = body.bias_pairs()
    if bias and bias[-1][0] >= host.tokenizer.vocab_size:
        V = host.tokenizer.vocab_size
        raise bad_request(f"logit_bias names token {bias[-1][0]}, but {host.id!r} has {V} tokens (ids 0 to {V - 1})",
                          "logit_bias")
    room = host.context - prompt_len
    if room < 1:
        raise bad_request(f"this model's context is {host.context} tokens, but the prompt has {prompt_len}; "
                          "shorten the messages", "messages")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is not None and max_tokens > room:
        raise bad_request(f"this model's context is {host.context} tokens: the prompt has {prompt_len}, so "
                          f"max_tokens can be at most {room}, got {max_tokens}", "max_tokens")
    share = host.scheduler.client_share
    if body.n > share:
        raise bad_request(f"n can be at most {share} on this server (half its queue), got {body.n}", "n")
    budget = host.max_request_tokens
    if max_tokens is not None and body.n * max_tokens > budget:
        raise bad_request(f"n x max_tokens is {body.n * max_tokens}; one request may ask for at most {budget} "
                          "tokens in all: lower n or max_tokens", "max_tokens")
    if max_tokens is None:  # the default shrinks to fit the budget rather than refuse a request that set nothing
        max_tokens = max(1, min(room, default_max, budget // body.n))
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    if top_k is not None and top_k > host.tokenizer.vocab_size:
        top_k = None  # larger than the vocabulary: no filtering at all
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p if body.top_p < 1.0 else None, top_k=top_k, min_p=body.min_p or None,
                          repetition_penalty=body.repetition_penalty, seed=body.seed,
                          frequency_penalty=body.frequency_penalty or 0.0,
                          presence_penalty=body.presence_penalty or 0.0, logit_bias=bias,
                          stop_token_ids=stops, stop_strings=tuple(body.stop_list()), logprobs=logprobs)


def _render(host, messages: list[dict], body: ChatCompletionRequest) -> tuple[list[int], list[dict]]:
    """Token ids of the conversation (+ the assistant's turn opening), and the messages they contain.
    With truncate_history, the oldest turns go first (as in the terminal chat) until the prompt leaves
    room for an answer; the system prompt and the last message always stay."""
    from ..chat_template import render_conversation

    def render(msgs):
        return render_conversation(msgs, host.tokenizer, host.template, add_generation_prompt=True,
                                   default_system=host.default_system, image_tokens=host.image_tokens)[0]
    ids = render(messages)
    want = min(body.max_completion_tokens or body.max_tokens or 256, max(1, host.context // 4))
    if not body.truncate_history or len(ids) + want <= host.context:
        return ids, messages
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    # where the kept part may start: a question (a conversation restarts at one), or the last message.
    # Fewer turns never need more tokens, so the shortest history that fits is found by bisection:
    # O(log n) renders, not one per dropped turn (a long history would make that quadratic)
    starts = [i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"]
    if not starts or starts[-1] != len(turns) - 1:
        starts.append(len(turns) - 1)
    lo, hi = 0, len(starts) - 1
    best = render(system + turns[starts[hi]:])
    while lo < hi:  # invariant: starts[hi] fits (or is the last resort)
        mid = (lo + hi) // 2
        cand = render(system + turns[starts[mid]:])
        if len(cand) + want <= host.context:
            hi, best = mid, cand
        else:
            lo = mid + 1
    return best, system + turns[starts[hi]:]


@dataclass
class ChatJob:
    """A chat request made ready to generate: everything checked (a 400 raised otherwise), nothing run."""
    host: object
    messages: list[dict]   # as the chat template takes them (tools folded in)
    kept: list[dict]       # what the model reads (after truncate_history)
    ids: list[int]
    sp: SamplingParams
    embeds: object
    tool_mode: bool        # the answer may be tool calls (tools.parse_calls)


async def prepare_chat(body: ChatCompletionRequest, request: Request) -> ChatJob:
    """The checks and the work before generation that /v1/chat/completions and /v1/responses share."""
    app = request.app
    host = _host(app, body.model)
    if host.template is None:
        raise bad_request(f"model {host.id!r} has no chat template (it was not trained for chat); "
                          "use /v1/completions", "model")
    pictures = any(m.has_images() for m in body.messages)
    if pictures and host.vision is None:
        raise bad_request(cannot_see(host, app.state.hosts.values()), "messages")
    tools.check_conversation(body)
    messages = await asyncio.to_thread(request_messages, body, host) if pictures else request_messages(body, host)
    messages = tools.fold(messages, body, host.default_system)
    try:
        ids, kept = await asyncio.to_thread(_render, host, messages, body)
    except PicochatError as e:
        raise bad_request(str(e), "messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    sp = _params(body, host, len(ids), app.state.default_max_tokens, host.stop_ids,
                 (body.top_logprobs or 0) if body.logprobs else None)
    if body.response_format is not None and body.response_format.type != "text":
        sp.grammar = await asyncio.to_thread(response_grammar, host, body.response_format)
    tool_mode = tools.choice_of(body) != "none"
    if tool_mode:
        sp.grammar = await asyncio.to_thread(tools.compiled_grammar, body, host)
    try:  # (once the prompt is known to fit)
        embeds = await prompt_embeds(host, ids, kept) if pictures else None
    except PicochatError as e:
        raise bad_request(str(e), "messages") from None
    return ChatJob(host, messages, kept, ids, sp, embeds, tool_mode)
