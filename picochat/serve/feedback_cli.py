"""``picochat feedback export OUT.jsonl`` and ``picochat feedback stats``: the ratings collected by the page.

Export writes one preference pair per line in trl's conversational format (docs/api.md), ready for
the reward and DPO stages. It reads the server's database while the server runs (WAL lets a reader
and a writer work at once) and replaces OUT atomically, so a crash never leaves half a file. OUT is
made 0600: it holds people's chats, like the database. Pairs whose prompt the chat template refuses
(stored before the store checked turn order) are left out and counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class ExportArgs:
    out: str = ""
    """the .jsonl file to write (replaced atomically)"""
    db: str | None = None
    """the conversation database; if omitted, $PICOCHAT_HOME/picochat.db (the server's default)"""


@dataclass
class StatsArgs:
    db: str | None = None
    """the conversation database; if omitted, $PICOCHAT_HOME/picochat.db (the server's default)"""


def _open(db: str | None):
    from .store import Store, default_db_path
    path = Path(db) if db else default_db_path()
    # Store() would create an empty database: a typo in --db must be an error, not an empty export
    if not path.is_file():
        raise PicochatError(f"no conversation database at {path}: start `picochat serve` and chat first, "
                            "or pass --db PATH")
    return Store(path)


def export(cfg: ExportArgs) -> int:
    from ..fsutil import atomic_open
    counts, skipped = {"ranking": 0, "thumbs": 0}, []
    with _open(cfg.db) as store, atomic_open(cfg.out, mode=0o600) as f:
        for pair in store.preference_pairs(skipped.append):
            f.write((json.dumps(pair, ensure_ascii=False) + "\n").encode("utf-8"))
            counts[pair["source"]] += 1
    print(f"wrote {sum(counts.values())} preference pairs ({counts['ranking']} from rankings, "
          f"{counts['thumbs']} from thumbs) -> {cfg.out}")
    if skipped:
        s = skipped[0]
        print(f"skipped {len(skipped)} pairs whose prompt the chat template refuses (stored by an older picochat),"
              f" e.g. messages {s['chosen_id']}/{s['rejected_id']} of conversation {s['conversation_id']}:"
              f" {s['reason']}")
    return 0


def stats(cfg: StatsArgs) -> int:
    with _open(cfg.db) as store:
        s = store.stats()
    by_source = ", ".join(f"{k} {v}" for k, v in sorted(s["conversations_by_source"].items()))
    print(f"conversations  {s['conversations']}" + (f" ({by_source})" if by_source else ""))
    print(f"messages       {s['messages']}")
    print(f"thumbs         {s['thumbs_up']} up, {s['thumbs_down']} down")
    print(f"rankings       {s['rankings']}")
    print(f"pairs          {s['pairs']['ranking'] + s['pairs']['thumbs']} "
          f"({s['pairs']['ranking']} from rankings, {s['pairs']['thumbs']} from thumbs)"
          + (f", {s['skipped_pairs']} skipped (their prompt breaks the chat template's turn order)"
             if s["skipped_pairs"] else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("feedback", help="export the ratings collected by the web page as preference pairs",
                       description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="feedback_verb", metavar="<command>", required=True)
    pe = verbs.add_parser("export", help="write preference pairs (trl conversational format) to a JSONL file")
    add_dataclass_args(pe, ExportArgs, positional=("out",))
    pe.set_defaults(func=lambda args: export(dataclass_from_args(ExportArgs, args)))
    ps = verbs.add_parser("stats", help="count conversations, messages, ratings and preference pairs")
    add_dataclass_args(ps, StatsArgs)
    ps.set_defaults(func=lambda args: stats(dataclass_from_args(StatsArgs, args)))
