"""Preference pairs from the feedback in the store, in trl's conversational format (docs/api.md).

Two sources: explicit rankings (the page's "A is better than B"), and sibling answers to the same
user message of which one got a thumbs up and the other a thumbs down. A pair that is ranked is not
repeated from thumbs: the explicit judgement wins, even where the thumbs disagree with it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

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


def preference_pairs(store: "Store") -> Iterator[dict[str, Any]]:
    """prompt = the system prompt (if any) + the path from the root to the shared user message."""
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
        path, node = [], msgs[chosen]["parent_id"]
        while node is not None:
            path.append({"role": msgs[node]["role"], "content": msgs[node]["content"]})
            node = msgs[node]["parent_id"]
        path.reverse()
        # API conversations may hold the system message itself: do not say it twice
        if conv["system_prompt"] and (not path or path[0]["role"] != "system"):
            path.insert(0, {"role": "system", "content": conv["system_prompt"]})
        yield {"prompt": path,
               "chosen": [{"role": "assistant", "content": msgs[chosen]["content"]}],
               "rejected": [{"role": "assistant", "content": msgs[rejected]["content"]}],
               "source": source, "model": msgs[chosen]["model"] or conv["model"],
               "conversation_id": cid, "created_at": created_at}


def feedback_stats(store: "Store") -> dict:
    def one(sql):
        return store._read(sql)[0][0]
    pairs = {"ranking": 0, "thumbs": 0}
    for c in pair_candidates(store):
        pairs[c[3]] += 1
    return {"conversations": one("SELECT COUNT(*) FROM conversations"),
            "conversations_by_source": {r[0]: r[1] for r in store._read(
                "SELECT source, COUNT(*) FROM conversations GROUP BY source")},
            "messages": one("SELECT COUNT(*) FROM messages"),
            "thumbs_up": one("SELECT COUNT(*) FROM ratings WHERE rating = 1"),
            "thumbs_down": one("SELECT COUNT(*) FROM ratings WHERE rating = -1"),
            "rankings": one("SELECT COUNT(*) FROM rankings"),
            "pairs": pairs}
