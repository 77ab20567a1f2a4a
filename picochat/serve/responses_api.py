"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id} (OpenAI's newer API, which the
`openai` SDK's client.responses and agent frameworks call).

A request becomes a chat request (responses_protocol.py) and runs through the same path as
/v1/chat/completions (chat_prepare.prepare_chat: template, tools, structured output, sampling, the scheduler).
Its output is a list of items: one assistant `message` with an `output_text` part, or one `function_call`
item per tool call. With `store` (the default) the response and the conversation up to its answer are kept
in the SQLite store (store_responses.py), so `previous_response_id` continues it, also after a restart;
`store: false` keeps nothing. Streamed, the events are OpenAI's: response.created, response.in_progress,
output_item.added, content_part.added, output_text.delta ... output_text.done, content_part.done,
output_item.done (or function_call_arguments.delta / .done for a call), then response.completed (or
response.incomplete when max_output_tokens cut the answer).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import store_responses
from .errors import ApiError, bad_request, not_found
from .logprobs import chat_content
from .chat_prepare import prepare_chat
from .openai_api import _SPLITTERS, _chain, _check_error, _first, _generate, _new_state
from .responses_protocol import ResponsesRequest, chat_request, input_messages
from .store_rules import NotFound
from .tools import ChatDeltas, parse_calls

router = APIRouter()


def _store(request: Request, field: str):
    store = request.app.state.store
    if store is None:
        raise not_found("this server keeps no store (it runs with --no-store): responses are not kept", field)
    return store


def _body(rid: str, body: ResponsesRequest, host, created: float, status: str, output: list, usage=None) -> dict:
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else \
        {"type": "text"}
    choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice or "auto"
    return {"id": rid, "object": "response", "created_at": int(created), "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": host.id,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "temperature": body.temperature if body.temperature
            is not None else 1.0, "top_p": body.top_p if body.top_p is not None else 1.0, "tool_choice": choice,
            "tools": [t.model_dump(exclude={"description"} if t.description is None else set())
                      for t in body.tools or []],
            "text": {"format": fmt},
            "truncation": body.truncation or "disabled", "top_logprobs": body.top_logprobs,
            "metadata": body.metadata or {}, "store": body.store, "background": False, "service_tier": "default",
            "reasoning": None} | ({"user": body.user} if body.user is not None else {}) | \
        ({"usage": usage} if usage is not None else {})


def _usage(state: dict, prompt_len: int) -> dict:
    return {"input_tokens": prompt_len, "input_tokens_details": {"cached_tokens": state["cached"]},
            "output_tokens": state["tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_len + state["tokens"]}


def _message_item(mid: str, text: str, status: str, logprobs) -> dict:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def _call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def _answer(text: str, finish: str, tool_mode: bool) -> tuple[list[dict], dict]:
    """(the output's calls or [], the assistant turn to store) of a finished answer."""
    calls = (parse_calls(text, cut=finish == "length") if tool_mode else None) or []
    turn = {"role": "assistant", "content": None, "tool_calls": calls} if calls else {"role": "assistant",
                                                                                      "content": text}
    return calls, turn


def _responses_name(param):
    """A chat-completions field's name as the Responses API calls it."""
    if not param:
        return param
    for chat, ours in (("messages", "input"), ("response_format.json_schema.schema", "text.format.schema"),
                       ("response_format", "text.format"), ("max_completion_tokens", "max_output_tokens"),
                       ("max_tokens", "max_output_tokens")):
        if param == chat or param.startswith(chat + "."):
            return ours if chat == "messages" else ours + param[len(chat):]
    if param.startswith("tools.") and ".function." in param:
        return param.replace(".function.", ".", 1)
    return param


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    history = []
    if body.previous_response_id is not None:
        store = _store(request, "previous_response_id")
        try:
            _, history = await asyncio.to_thread(store_responses.get, store, body.previous_response_id,
                                                 "previous_response_id")
        except NotFound as e:
            raise bad_request(f"previous_response_id: {e.message}", "previous_response_id") from None
    new = input_messages(body)
    try:
        job = await prepare_chat(chat_request(body, history, new), request)
    except ApiError as e:  # the chat request's names: its messages are instructions + the chain + this input
        e.param = _responses_name(e.param)
        raise
    host, rid, created = job.host, f"resp_{uuid.uuid4().hex}", time.time()
    store = request.app.state.store if body.store else None
    if store is None:
        body.store = False  # (--no-store: the body says what happened)
    state = _new_state(1)
    lps = (lambda s: chat_content(host.tokenizer, s["logprobs"] or [])) if body.logprobs_wanted() else (lambda s: [])

    def finish(output_text_id: str, streamed_ids: tuple = ()) -> dict:
        """The final body, stored if asked: the calls keep the ids a stream already showed (the client
        answers them by those); a generation that never finished (the client left) is not stored."""
        s = state[0]
        status = "incomplete" if s["finish_reason"] == "length" else "completed"
        calls, turn = _answer(s["text"], s["finish_reason"], job.tool_mode)
        for call, cid in zip(calls, streamed_ids):
            call["id"] = cid
        output = [_call_item(c) for c in calls] or [_message_item(output_text_id, s["text"], status, lps(s))]
        final = _body(rid, body, host, created, status, output, _usage(s, len(job.ids)))
        if store is not None and s["finish_reason"] is not None:
            store_responses.save(store, final, history + new + [turn], body.previous_response_id)
        return final
    mid = f"msg_{uuid.uuid4().hex}"
    if not body.stream:
        async for _ in _generate(request, host, job.ids, job.sp, 1, state, body.prompt_cache_key, job.embeds):
            pass
        _check_error(state)
        return JSONResponse(await asyncio.to_thread(finish, mid))
    gen = _generate(request, host, job.ids, job.sp, 1, state, body.prompt_cache_key, job.embeds)
    first = await _first(gen)  # submitted before answering 200: a full queue is a real 503
    return StreamingResponse(_events(body, host, rid, created, mid, job.tool_mode, first, gen, finish),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                      "X-Accel-Buffering": "no"})


async def _events(body, host, rid, created, mid, tool_mode, first, gen, finish):
    seq = [0]

    def event(kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": seq[0], **fields}
        seq[0] += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False).translate(_SPLITTERS)}\n\n"
    deltas, text_open, calls = ChatDeltas(tool_mode), False, []
    try:
        start = _body(rid, body, host, created, "in_progress", [])
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        async for _, ev in _chain(first, gen):
            if ev.finish_reason == "error":
                yield event("error", code="server_error", message=f"generation failed: {ev.error}", param=None)
                return
            for d in deltas.push(ev.text):
                if "content" in d:
                    if not text_open:
                        text_open = True
                        yield event("response.output_item.added", output_index=0,
                                    item=_message_item(mid, "", "in_progress", [])
                                    | {"content": []})
                        yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                    yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                                delta=d["content"], logprobs=[])
                    continue
                call = d["tool_calls"][0]
                if "id" in call:  # a new call: its item opens
                    calls.append({"id": call["id"], "function": {"name": call["function"]["name"], "arguments": ""}})
                    yield event("response.output_item.added", output_index=len(calls) - 1,
                                item=_call_item(calls[-1], "in_progress"))
                else:
                    calls[-1]["function"]["arguments"] += call["function"]["arguments"]
                    yield event("response.function_call_arguments.delta", output_index=len(calls) - 1,
                                item_id=_call_item(calls[-1])["id"], delta=call["function"]["arguments"])
        final = await asyncio.to_thread(finish, mid, tuple(c["id"] for c in calls))
        for k, item in enumerate(final["output"]):
            if item["type"] == "function_call":
                yield event("response.function_call_arguments.done", output_index=k, item_id=item["id"],
                            name=item["name"], arguments=item["arguments"])
            else:
                part = item["content"][0]
                if not text_open:  # (an empty answer)
                    yield event("response.output_item.added", output_index=0,
                                item=_message_item(mid, "", "in_progress", []) | {"content": []})
                    yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0,
                            text=part["text"], logprobs=part["logprobs"])
                yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part)
            yield event("response.output_item.done", output_index=k, item=item)
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
    finally:
        await gen.aclose()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    body, _ = await asyncio.to_thread(store_responses.get, _store(request, "response_id"), response_id)
    return body


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    await asyncio.to_thread(store_responses.delete, _store(request, "response_id"), response_id)
    return {"id": response_id, "object": "response", "deleted": True}

