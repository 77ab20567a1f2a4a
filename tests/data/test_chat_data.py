"""Chat data: generated tasks (held-out splits, the answer rule), named sets, user JSONL validation, CLI."""
import json
import os

import pytest

from picochat.chat_template import render_conversation, turn_order_error
from picochat.cli import main
from picochat.data import chat_sources
from picochat.data.chat_data import list_sets, load_mixture, parse_spec
from picochat.data.chat_tasks import TASKS, extract_answer
from picochat.errors import PicochatError
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    # the default special tokens include picochat's <|user_start|> ... <|assistant_end|>
    return Tokenizer.train(["What is 12 + 30? The answer is 42. Hello there, how are you today?"] * 20, 400)


def _questions(items):
    return {it["messages"][0]["content"] for it in items}


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_disjoint_deterministic_and_valid(name, tok):
    task = TASKS[name]
    train = task.generate("train", 3000, seed=1) + task.generate("train", 3000, seed=2)
    test = task.generate("test", 3000, seed=0)
    assert not _questions(train) & _questions(test), "a held-out question reached the train split"
    assert task.generate("test", 50, seed=3) == task.generate("test", 50, seed=3)
    assert task.generate("train", 50, seed=3) != task.generate("train", 50, seed=4)
    # test share is about TEST_PERCENT of the keys
    assert 0.05 < task.size("test") / (task.size("test") + task.size("train")) < 0.25
    for it in (train[:200] + test[:200]):
        roles = [m["role"] for m in it["messages"]]
        assert turn_order_error(roles) is None and roles[-1] == "assistant"
        assert all(m["content"].strip() for m in it["messages"])
        if task.checkable:
            assert task.check(it["messages"][-1]["content"], it["answer"]), it
        else:
            assert it["answer"] is None
    ids, mask = render_conversation(train[0]["messages"], tok)
    assert sum(mask) > 0 and len(ids) == len(mask)


def test_split_membership_is_shared_across_tasks():
    # a held-out 2-digit sum is held out in addition and in word problems too, in either order
    test2 = {(it["messages"][0]["content"], it["answer"]) for it in TASKS["addition2"].generate("test", 10**6)}
    assert len(test2) == TASKS["addition2"].size("test")
    held = {k for k in TASKS["addition2"].split_keys("test")}
    assert held and all(TASKS["addition"].in_split(k, "test") for k in held)
    assert all(TASKS["word_problems"].in_split(k, "test") for k in held if k[1] >= 1)
    assert not held & set(TASKS["word_problems"].split_keys("train"))


def test_n_larger_than_split_gives_all_of_it():
    t = TASKS["identity"]
    assert len(t.generate("test", 10**6)) == t.size("test")
    assert len(t.generate("train", 5)) == 5
    assert {"Who are you?", "What is your name?"} <= _questions(t.generate("train", 10**6))


@pytest.mark.parametrize("reply,answer,ok", [
    ("23 + 45 = 68.", "68", True),
    ("The answer is 68", "68", True),
    ("68", "68", True),
    ("The answer is 68, not 67.", "68", False),   # the LAST number counts
    ("I think it is 86.", "68", False),
    ("68.0", "68", True),                          # compared as numbers
    ("68.5", "68", False),
    ("5 - 10 = -5.", "-5", True),
    ("10-5", "5", True),                           # a minus glued to a digit is subtraction
    ("It is 1,000 meters.", "1000", True),
    ("No idea.", "68", False),
    ("", "68", False),
])
def test_check_numbers(reply, answer, ok):
    assert TASKS["addition"].check(reply, answer) is ok


def test_check_words_and_spelling():
    wd, sp = TASKS["weekday"], TASKS["spell"]
    assert wd.check("It is Tuesday.", "Tuesday") and wd.check("tuesday", "Tuesday")
    assert not wd.check("Tuesday, no wait, Friday", "Tuesday") and not wd.check("Tuesdays", "Tuesday")
    assert sp.check('"cat" is spelled c-a-t.', "c-a-t") and sp.check("C-A-T", "c-a-t")
    assert not sp.check("c-a-t-s", "c-a-t") and not sp.check("cat", "c-a-t")
    assert not sp.check("c-a-t, or rather d-o-g", "c-a-t")
    assert extract_answer("nothing here", "spelling") is None
    with pytest.raises(PicochatError, match="no exact answer"):
        TASKS["greetings"].check("Hello!", "Hello")


def test_chatterbot_loads():
    records = chat_sources.chatterbot()
    good = [conv for _, conv in records if not isinstance(conv, str) and chat_sources.validate(conv) is None]
    assert len(good) > 1000
    convs, report = load_mixture("chatterbot")
    assert len(convs) > 1000 and report["sets"]["chatterbot"] == len(convs)
    test, _ = load_mixture("chatterbot", split="test")
    assert test and not {c[0]["content"] for c in test} & {c[0]["content"] for c in convs}
    for problem in report["problems"]:  # an upstream defect is reported with its file and line
        assert ".yml:" in problem


@pytest.mark.skipif(not chat_sources.FAQ_DIR.is_dir() and not os.environ.get("CI"),
                    reason="Debian's python3.11-doc is not installed (apt-get install python3.11-doc)")
def test_python_faq():
    records = chat_sources.python_faq()
    assert len(records) > 150
    q = {conv[0]["content"]: conv[1]["content"] for where, conv in records if "general.rst" in where}
    assert "What is Python?" in q and "interpreted" in q["What is Python?"]
    assert all(":ref:" not in a and "``" not in a and ">`_" not in a for _, conv in records
               for a in [conv[1]["content"]])
    assert all(chat_sources.validate(conv) is None for _, conv in records)


def test_python_faq_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(chat_sources, "FAQ_DIR", tmp_path / "absent")
    row = next(r for r in list_sets() if r["name"] == "python_faq")
    assert row["available"] is False and row["size"] is None and "apt-get install python3.11-doc" in row["description"]
    with pytest.raises(PicochatError, match="apt-get install python3.11-doc"):
        load_mixture("python_faq")


def test_bad_jsonl_reported_and_skipped(tmp_path, tok):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}
    lines = [json.dumps(ok),                                                                   # 1
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),                     # 2
             json.dumps({"messages": [{"role": "user", "content": ""},
                                      {"role": "assistant", "content": "a"}]}),                 # 3
             json.dumps({"messages": [{"role": "user", "content": 5},
                                      {"role": "assistant", "content": "a"}]}),                 # 4
             '{"messages": [',                                                                  # 5
             json.dumps({"messages": [{"role": "assistant", "content": "first"}]}),             # 6
             json.dumps({"messages": [{"role": "user", "content": "long " * 300},
                                      {"role": "assistant", "content": "ok"}]}),                # 7
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),        # 8
             ""]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines))
    convs, report = load_mixture(str(path), max_tokens=100, tokenizer=tok)
    assert convs == [ok["messages"]] and report["skipped"] == 7
    reasons = {int(p.split(":")[1]): p for p in report["problems"]}
    assert all(p.startswith(f"{path}:") for p in report["problems"])
    assert "unknown role" in reasons[2] and "empty content" in reasons[3]
    assert "must be a string" in reasons[4] and "broken JSON" in reasons[5]
    assert "must answer a user message" in reasons[6] and "longer than the context of 100" in reasons[7]
    assert "no assistant message" in reasons[8]
    with pytest.raises(PicochatError, match=f"{path}:2: message 0: unknown role"):
        load_mixture(str(path), strict=True)
    # N cycles a file set larger than its size
    convs, report = load_mixture(f"{path}:5")
    assert len(convs) == 5 and report["sets"][str(path)] == 5


def test_mixture_counts_and_errors():
    convs, report = load_mixture("arithmetic:30,identity:7,greetings:3", seed=1)
    assert report["sets"] == {"arithmetic": 30, "identity": 7, "greetings": 3} and len(convs) == 40
    assert convs == load_mixture("arithmetic:30,identity:7,greetings:3", seed=1)[0]
    test, _ = load_mixture("addition2:100", split="test")
    train, _ = load_mixture("addition2:3000")
    assert not {c[0]["content"] for c in test} & {c[0]["content"] for c in train}
    with pytest.raises(PicochatError, match="known sets: addition.*chatterbot"):
        load_mixture("arithmetic:10,nonsense")
    with pytest.raises(PicochatError, match="no such file"):
        load_mixture("missing.jsonl")
    with pytest.raises(PicochatError, match="whole number"):
        parse_spec("arithmetic:lots")


def test_cli_list_and_write(capsys, tmp_path):
    assert main(["data", "chat", "--list"]) == 0
    out = capsys.readouterr().out
    for row in list_sets():
        assert row["name"] in out
    assert "chatterbot" in out and "addition2" in out
    path = tmp_path / "mix.jsonl"
    assert main(["data", "chat", "--data", "identity:4,addition:6", "--out", str(path), "--show", "1"]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 10 and all(turn_order_error([m["role"] for m in r["messages"]]) is None for r in rows)
    assert main(["data", "chat", "--data", "bogus"]) == 2
    assert "known sets" in capsys.readouterr().err
