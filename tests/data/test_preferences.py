"""Preference rows: trl's conversational pairs (what `picochat feedback export` writes), rankings expanded to
pairs, and every kind of bad row reported with its file and line, skipped with a count, or refused."""
import json

import pytest

from picochat.data.preferences import expand_ranking, read_preferences
from picochat.errors import PicochatError
from picochat.tokenizer import Tokenizer

U = [{"role": "user", "content": "What is 2 + 2?"}]


def a(text):
    return [{"role": "assistant", "content": text}]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_export_rows_rankings_and_strings_are_read(tmp_path):
    export_row = {"prompt": [{"role": "system", "content": "Be brief."}, *U], "chosen": a("4"), "rejected": a("5"),
                  "source": "ranking", "model": "smollm2", "conversation_id": "c1", "created_at": 1.0}
    rows = [export_row, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": U, "completions": ["4", "four", "5"], "ranking": [1, 0, 2]}]
    pairs, report = read_preferences(write(tmp_path / "p.jsonl", rows))
    assert report == {"rows": 3, "pairs": 1 + 1 + 3, "skipped": 0, "problems": []}
    assert pairs[0] == {"prompt": export_row["prompt"], "chosen": a("4"), "rejected": a("5"),
                        "kind": "ranking"}  # extra keys dropped; the source kept as the kind reports split by
    assert pairs[1]["prompt"] == [{"role": "user", "content": "Hi"}] and pairs[1]["chosen"] == a("Hello!")
    # ranking [1, 0, 2]: "four" > "4" > "5" -> (four, 4), (four, 5), (4, 5)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs[2:]] == [
        ("four", "4"), ("four", "5"), ("4", "5")]


def test_expand_ranking_gives_every_ordered_pair():
    pairs = expand_ranking(U, ["a", "b", "c", "d"])
    assert len(pairs) == 4 * 3 // 2
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"),
                                                            ("b", "d"), ("c", "d")}


def test_bad_rows_are_reported_with_file_and_line_and_skipped(tmp_path):
    tok = Tokenizer.train(["What is two plus two? It is four. " * 20], 300)
    good = {"prompt": U, "chosen": a("4"), "rejected": a("5")}
    rows = [good,
            {"prompt": U, "chosen": a("4"), "rejected": a("4")},                     # 2 identical
            {"prompt": U, "chosen": a("4")},                                          # 3 missing rejected
            {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": a("4"), "rejected": a("5")},  # 4 role
            "{not json",                                                              # 5 broken JSON
            {"prompt": [{"role": "user", "content": "x" * 400}], "chosen": a("4"), "rejected": a("5")},  # 6 long
            {"prompt": U, "chosen": a(""), "rejected": a("5")},                       # 7 empty content
            {"prompt": U, "chosen": [{"role": "user", "content": "4"}], "rejected": a("5")},  # 8 not an answer
            {"prompt": U, "completions": ["4", "5"], "ranking": [0, 0]},             # 9 bad ranking
            [1, 2]]                                                                   # 10 not an object
    path = write(tmp_path / "bad.jsonl", rows)
    pairs, report = read_preferences(path, tokenizer=tok, max_tokens=64)
    assert len(pairs) == 1 and report["skipped"] == 9 and report["rows"] == 10
    want = {2: "same answer", 3: 'missing field "rejected"', 4: "unknown role 'wizard'", 5: "broken JSON",
            6: "longer than the context of 64", 7: "empty content", 8: "assistant messages only",
            9: "permutation of 0..1", 10: "JSON object"}
    for (line, text), msg in zip(want.items(), report["problems"]):
        assert msg.startswith(f"{path}:{line}: ") and text in msg, msg
    with pytest.raises(PicochatError, match=rf"bad.jsonl:2: .*same answer.*strict"):
        read_preferences(path, strict=True)
    with pytest.raises(PicochatError, match="picochat feedback export"):
        read_preferences(tmp_path / "missing.jsonl")
