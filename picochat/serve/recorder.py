"""Storing a chat completion: everything checked before generation, one transaction after it.

Two ways in, as docs/api.md says:
- the web page names its conversation (`metadata.conversation_id` + `parent_id`, the user message to
  answer): the messages it sends must be that stored path (the system prompt aside), so that an answer
  is always stored under the conversation the model saw;
- any other request becomes a new API conversation holding the messages the model saw (after
  `truncate_history`: the dropped ones are counted in the settings, not stored) and its answers.
Storing never fails the response: the request was checked up front, and a database error after the
answer was sent is logged, not thrown into a stream that is closing.

Pictures are part of a message: the page's messages match the stored path only if their pictures are the
stored ones (same bytes, same place in the text), and an API conversation stores the pictures it was sent.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from .errors import bad_request
from .images import for_store, signature, stored_signature
from .protocol import ChatCompletionRequest, ConversationMeta
from .store_rules import settings_json

log = logging.getLogger("picochat.serve")


class Recorder:
    def __init__(self, store, host, settings: dict, cid: Optional[str], parent_id: Optional[int],
                 messages: list[dict], system_prompt: Optional[str] = None):
        self.store, self.host, self.settings, self.cid, self.parent_id = store, host, settings, cid, parent_id
        self.messages, self.system_prompt = messages, system_prompt
        self.saved = False

    @property
    def conversation_id(self) -> Optional[str]:
        """The conversation the request named (its prefix cache is scoped to it), or None."""
        return self.cid

    @classmethod
    async def create(cls, store, body: ChatCompletionRequest, messages: list[dict], kept: list[dict], host,
                     settings: dict) -> "Recorder":
        """messages: as sent (roles mapped); kept: what the model will see (after truncate_history)."""
        meta = body.metadata or {}
        dropped = len(messages) - len(kept)
        if dropped:
            settings = settings | {"dropped_messages": dropped}
        system = kept[0]["content"] if kept and kept[0]["role"] == "system" else None
        if "conversation_id" not in meta:
            settings_json(settings)
            return cls(store, host, settings, None, None, kept[1 if system is not None else 0:], system)
        try:
            m = ConversationMeta(conversation_id=meta["conversation_id"], parent_id=meta.get("parent_id", ""))
        except ValueError:
            raise bad_request("metadata.parent_id must be the id (an integer) of a stored message",
                              "metadata") from None
        path = await asyncio.to_thread(store.path_to, m.conversation_id, m.parent_id)
        sent = [(x["role"], signature(x["content"])) for x in messages if x["role"] != "system"]
        stored = [(x["role"], stored_signature(x)) for x in path if x["role"] != "system"]
        if sent != stored:
            raise bad_request(f"the messages sent are not conversation {m.conversation_id} up to message "
                              f"{m.parent_id}: send that path (its system prompt aside, its pictures included), "
                              "or leave out metadata to start a new conversation", "messages")
        conv = await asyncio.to_thread(store.conversation, m.conversation_id)
        if (system or "").strip() != (conv["system_prompt"] or "").strip():
            # the page's system prompt changed since the conversation was stored: keep the one the model saw
            settings = settings | {"system_prompt": system or ""}
        settings_json(settings)  # storable (a 400 now, not a failed save after the answer)
        return cls(store, host, settings, m.conversation_id, m.parent_id, [])

    def save(self, state: list[dict]) -> None:
        """Called once the generation is over (or abandoned); idempotent."""
        if self.saved or not state[0].get("submitted"):  # refused (4xx/503): nothing to keep
            return
        self.saved = True
        from .openai_api import timing
        answers = [{"content": s["text"], "model": self.host.id,
                    "settings": self.settings | ({"timing": t} if (t := timing(s)) else {}),
                    "finish_reason": s["finish_reason"] or "cancelled", "prompt_tokens": s["prompt_tokens"],
                    "completion_tokens": s["tokens"]} for s in state if s["finish_reason"] != "error"]
        if not answers:
            return
        new = None if self.cid is not None else {"model": self.host.id, "system_prompt": self.system_prompt,
                                                  "settings": self.settings, "source": "api"}
        try:
            self.store.record_exchange(conversation_id=self.cid, parent_id=self.parent_id,
                                       messages=[for_store(m) for m in self.messages], answers=answers,
                                       new_conversation=new)
        except Exception:
            log.exception("could not store a chat completion (the client got its answer)")
