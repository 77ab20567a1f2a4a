"""Preference pairs from the feedback in the store, in trl's conversational format (docs/api.md).

Two sources: explicit rankings (the page's "A is better than B"), and sibling answers to the same
user message of which one got a thumbs up and the other a thumbs down. A pair that is ranked is not
repeated from thumbs: the explicit judgement wins, even where the thumbs disagree with it.

A pair whose prompt the chat template refuses (a database from before the store enforced turn order:
a system message deep in the tree, an answer under an answer) is skipped, never exported: training
on it would teach a conversation shape the model never sees when it serves. So is a pair whose prompt
holds a picture: the export is text, and the text alone is not what the model answered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from ..chat_template import turn_order_error
from ..data.preferences import check_pair
from .store import NotFound

if TYPE_CHECKING:
    from .store import Store


def pair_candidates(store: "Store") -> list[tuple]:
    """(conversation_id, chosen_id, rejected_id, source, created_at), rankings first, oldest first."""
    ranked = store._read(
        "SELECT m.conversation_id, k.chosen_id, k.rejected_id, 'ranking', k.created_at FROM rankings k"
        " JOIN messages m ON m.id = k.chosen_id ORDER BY k.id")
    thumbs = store._read(
        "SELECT a.conversation_id, a.id, b.id, 'thumbs', MAX(ra.created_at, rb.created_at)"
        " FROM messages a JOIN ratings ra ON ra.message_id = a.id AND ra.rating = 1"
        " JOIN messages b ON b.parent_id = a.parent_id AND b.id != a.id AND b.role = 'assistant'"
        " JOIN ratings rb ON rb.message_id = b.id AND rb.rating = -1"
        " JOIN messages p ON p.id = a.parent_id AND p.role = 'user'"
        " WHERE a.role = 'assistant' ORDER BY a.id, b.id")
    seen = {frozenset((r[1], r[2])) for r in ranked}
    return [tuple(r) for r in ranked] + [tuple(r) for r in thumbs if frozenset((r[1], r[2])) not in seen]


def preference_pairs(store: "Store", on_skip: Optional[Callable[[dict], None]] = None) -> Iterator[dict[str, Any]]:
    """prompt = the system prompt (if any) + the path from the root to the shared user message.

    A pair the chat template would refuse goes to on_skip({"conversation_id", "chosen_id", "rejected_id",
    "source", "reason"}) instead of being yielded."""
    cache: dict[str, tuple[dict, dict[int, dict]]] = {}
    for cid, chosen, rejected, source, created_at in pair_candidates(store):
        if cid not in cache:  # one read per conversation, however many pairs it holds
            try:
                conv = store.get_conversation(cid)
            except NotFound:  # deleted while we read (the server keeps running during an export)
                continue
            cache = {cid: (conv, {m["id"]: m for m in conv["messages"]})}
        conv, msgs = cache[cid]
        if chosen not in msgs or rejected not in msgs:  # deleted since pair_candidates() read them
            continue
        path, node, pictures = [], msgs[chosen]["parent_id"], 0
        while node is not None:
            path.append({"role": msgs[node]["role"], "content": msgs[node]["content"]})
            pictures += len(msgs[node].get("images") or [])
            node = msgs[node]["parent_id"]
        path.reverse()
        # the system prompt the answers saw: the page records it in an answer's settings when it differed
        # from the conversation's (edited between turns); two answers that saw different ones are no pair
        seen = {(msgs[i]["settings"] or {}).get("system_prompt", conv["system_prompt"]) or "" for i in (chosen, rejected)}
        system = seen.pop() if len(seen) == 1 else None
        # API conversations may hold the system message itself: do not say it twice
        if system and (not path or path[0]["role"] != "system"):
            path.insert(0, {"role": "system", "content": system})
        why = turn_order_error([m["role"] for m in path], answer=True)
        if why is None and seen:
            why = "the two answers saw different system prompts"
        if why is None and pictures:  # its text alone is not what the model answered
            why = f"the prompt holds {pictures} picture(s); the export is text only"
        if why is None and not msgs[chosen]["role"] == msgs[rejected]["role"] == "assistant":
            why = "chosen and rejected must both be assistant messages"
        if why is None:  # the trainers' own rules (data/preferences.py), so every exported pair trains
            _, why = check_pair({"prompt": path, "chosen": msgs[chosen]["content"],
                                 "rejected": msgs[rejected]["content"]})
        if why is not None:
            if on_skip is not None:
                on_skip({"conversation_id": cid, "chosen_id": chosen, "rejected_id": rejected, "source": source,
                         "reason": why})
            continue
        yield {"prompt": path,
               "chosen": [{"role": "assistant", "content": msgs[chosen]["content"]}],
               "rejected": [{"role": "assistant", "content": msgs[rejected]["content"]}],
               "source": source, "model": msgs[chosen]["model"] or conv["model"],
               "conversation_id": cid, "created_at": created_at}


def feedback_stats(store: "Store") -> dict:
    def one(sql):
        return store._read(sql)[0][0]
    # the pairs an export would write, so that stats and export never disagree
    pairs, skipped = {"ranking": 0, "thumbs": 0}, []
    for p in preference_pairs(store, skipped.append):
        pairs[p["source"]] += 1
    return {"conversations": one("SELECT COUNT(*) FROM conversations"),
            "conversations_by_source": {r[0]: r[1] for r in store._read(
                "SELECT source, COUNT(*) FROM conversations GROUP BY source")},
            "messages": one("SELECT COUNT(*) FROM messages"),
            "thumbs_up": one("SELECT COUNT(*) FROM ratings WHERE rating = 1"),
            "thumbs_down": one("SELECT COUNT(*) FROM ratings WHERE rating = -1"),
            "rankings": one("SELECT COUNT(*) FROM rankings"),
            "pairs": pairs, "skipped_pairs": len(skipped)}
