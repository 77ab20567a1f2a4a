"""`picochat feedback export / stats`: preference pairs from the store, as JSONL trl reads."""
import json
import subprocess
import sys
from pathlib import Path

from picochat.cli import main
from picochat.serve.store import Store

ROOT = Path(__file__).resolve().parents[2]


def make_db(path: Path) -> str:
    with Store(path) as s:
        c = s.create_conversation(system_prompt="Be brief.", model="smollm2")
        u = s.add_message(c["id"], role="user", content="Capital of France?")
        a, b, x = (s.add_message(c["id"], role="assistant", content=t, parent_id=u["id"], model="smollm2")
                   for t in ("Paris.", "Lyon.", "It is Paris — la Ville Lumière."))
        s.add_ranking(a["id"], b["id"])
        s.set_rating(x["id"], 1)
        s.set_rating(b["id"], -1)
        return c["id"]


def test_export_format(tmp_path, capsys):
    cid = make_db(tmp_path / "f.db")
    out = tmp_path / "sub" / "pairs.jsonl"
    assert main(["feedback", "export", str(out), "--db", str(tmp_path / "f.db")]) == 0
    assert "wrote 2 preference pairs (1 from rankings, 1 from thumbs)" in capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    pairs = [json.loads(line) for line in lines]
    assert [p["source"] for p in pairs] == ["ranking", "thumbs"]
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "source", "model", "conversation_id", "created_at"}
        assert p["prompt"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Capital of France?"}]
        assert p["rejected"] == [{"role": "assistant", "content": "Lyon."}]
        assert p["model"] == "smollm2" and p["conversation_id"] == cid and isinstance(p["created_at"], float)
    assert pairs[1]["chosen"][0]["content"] == "It is Paris — la Ville Lumière."  # UTF-8, not \\u escapes
    assert "Ville Lumière" in lines[1]
    assert [f.name for f in out.parent.iterdir()] == ["pairs.jsonl"]  # no temporary file left behind


def test_stats_and_default_db(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_db(tmp_path / "picochat.db")
    assert main(["feedback", "stats"]) == 0
    out = capsys.readouterr().out
    assert "conversations  1 (web 1)" in out and "messages       4" in out
    assert "thumbs         1 up, 1 down" in out and "pairs          2" in out


def test_missing_db_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.db"
    assert main(["feedback", "export", str(tmp_path / "o.jsonl"), "--db", str(missing)]) == 2
    assert "no conversation database at" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "o.jsonl").exists()


def test_export_through_a_subprocess(tmp_path):
    make_db(tmp_path / "f.db")
    out = tmp_path / "pairs.jsonl"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PICOCHAT_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "picochat.cli", "feedback", "export", str(out), "--db",
                        str(tmp_path / "f.db")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len([json.loads(x) for x in out.read_text().splitlines()]) == 2
    r = subprocess.run([sys.executable, "-m", "picochat.cli", "feedback", "stats"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no conversation database")


def test_pairs_the_trainers_would_refuse_are_skipped_and_counted(tmp_path, capsys):
    """A ranked empty answer, or two identical ones, is no pair: export says so instead of writing it."""
    from picochat.data.preferences import read_preferences
    with Store(tmp_path / "f.db") as s:
        c = s.create_conversation(model="m")
        u = s.add_message(c["id"], role="user", content="Hi?")
        good, empty, same = (s.add_message(c["id"], role="assistant", content=t, parent_id=u["id"], model="m")
                             for t in ("Hello!", "", "Hello!"))
        s.add_ranking(good["id"], empty["id"])
        s.add_ranking(good["id"], same["id"])
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", str(out), "--db", str(tmp_path / "f.db")]) == 0
    text = capsys.readouterr().out
    assert "wrote 0 preference pairs" in text and "skipped 2" in text, text
    pairs, report = read_preferences(out)
    assert pairs == [] and report["skipped"] == 0
