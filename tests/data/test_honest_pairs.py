"""Honest pairs: the model's own answers judged by the task's rule. A chosen answer always passes the rule,
a rejected one always fails it, and the rows read back as preference data without a single skip."""
import json

import pytest

import picochat.eval.chat_eval as chat_eval
from picochat.data.chat_tasks import TASKS
from picochat.data.honest_pairs import KINDS, _right_start, honest_pairs
from picochat.data.preferences import read_preferences
from picochat.engine.engine import GenerationResult
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["What is 12 + 34? 12 + 34 = 46. The answer is 7. By the way. " * 30], 300)


def scripted(answers_for):
    """A stand-in for the engine: each prompt's samples come from answers_for(question, reference answer)."""
    def fake(model, tokenizer, template, conversations, max_tokens=32, batch_size=32, default_system=None,
             temperature=0.0, seed=0):
        out, seen = [], {}
        for conv in conversations:  # each question comes `samples` times in a row: the k-th gets answer k
            q = conv[-1]["content"]
            k = seen[q] = seen.get(q, -1) + 1
            text, finish = answers_for(q)[k % len(answers_for(q))]
            out.append(GenerationResult([], text, finish, 0))
        return out
    return fake


def _sum(q: str) -> int:
    import re
    a, b = map(int, re.findall(r"\d+", q)[:2])
    return a + b


def test_right_start_cuts_where_an_editor_would():
    check = lambda t: TASKS["addition2"].check(t, "140")  # noqa: E731
    assert _right_start("58 + 82 = 140. By the way, 33 + 54 = 87.", check) == "58 + 82 = 140."
    assert _right_start("58 + 82 = 140.", check) is None  # already right: nothing to edit
    assert _right_start("58 + 82 = 130. So 140? No.", check) is None


def test_pairs_are_honest_and_read_back_without_skips(tok, monkeypatch, tmp_path):
    def answers(q):
        s = _sum(q)
        if "?" in q:  # the model rambles on these: only an edit of its own answer is right
            return [(f"The answer is {s}. By the way, 10 + 11 = 21.", "stop"), (f"The answer is {s + 1}.", "stop"),
                    (f"The answer is {s}. By the way, 10 + 11", "length")]
        return [(f"The answer is {s}.", "stop"), (f"The answer is {s - 10}.", "stop"), ("", "stop")]
    monkeypatch.setattr(chat_eval, "greedy_results", scripted(answers))
    rows, report = honest_pairs(None, tok, "picochat", ["addition2"], 40, samples=3, pairs_per_question=3)
    assert report["questions"] == 40 and report["skipped_no_right_answer"] == 0
    assert report["chosen_model"] + report["chosen_edited"] == 40 and report["chosen_edited"] > 0
    task = TASKS["addition2"]
    for r in rows:
        s = str(_sum(r["prompt"][-1]["content"]))
        assert task.check(r["chosen"][0]["content"], s), r
        assert not task.check(r["rejected"][0]["content"], s), r
        assert r["kind"] in KINDS and r["rejected"][0]["content"].strip()
        assert "10 + 11 = 21" not in r["chosen"][0]["content"]
    wrong = [r for r in rows if r["kind"] == "wrong"]
    assert wrong and all(r["rejected"][0]["content"] != "" for r in wrong)  # empty answers are never pairs
    assert {"wrong"} < {r["kind"] for r in rows}  # synthetic kinds too
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, rep = read_preferences(path, tok, 96)
    assert rep["skipped"] == 0 and len(pairs) == len(rows)
    assert {p["kind"] for p in pairs} == {r["kind"] for r in rows}


def test_questions_never_answered_right_are_skipped_unless_reference(tok, monkeypatch):
    monkeypatch.setattr(chat_eval, "greedy_results", scripted(lambda q: [("I do not know 3.", "stop")] * 2))
    rows, report = honest_pairs(None, tok, "picochat", ["addition2"], 10, samples=2)
    assert rows == [] and report["skipped_no_right_answer"] == 10
    rows, report = honest_pairs(None, tok, "picochat", ["addition2"], 10, samples=2, reference=True)
    assert report["chosen_reference"] == 10 and rows
    assert all(TASKS["addition2"].check(r["chosen"][0]["content"], str(_sum(r["prompt"][-1]["content"])))
               for r in rows)


def test_only_checkable_tasks(tok):
    with pytest.raises(Exception, match="checkable"):
        honest_pairs(None, tok, "picochat", ["greetings"], 5)
