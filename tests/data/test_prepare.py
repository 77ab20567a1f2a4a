"""prepare_dataset: split by document, tokenize with <|endoftext|> separators, write shards + meta."""
import json

import numpy as np
import pytest

from picochat.cli import main
from picochat.data.prepare import (default_dataset_dir, ensure_default_dataset, load_meta,
                                   prepare_dataset, split_documents)
from picochat.errors import PicochatError
from picochat.tokenizer import EOT, Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def make_docs(n=30):
    # every document carries its own number, so we can tell documents apart after tokenizing
    rng = np.random.default_rng(0)
    return [f"Document {i} begins. " + " ".join(rng.choice(WORDS, 60)) + f"\n\nEnd of document {i}: ok."
            for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def read_split(out, name, meta, tok):
    ids = np.fromfile(out / f"{name}.bin", dtype=meta["dtype"])
    assert len(ids) == meta[f"{name}_tokens"]
    assert ids[0] == tok.eot_id  # every document is preceded by <|endoftext|>
    bounds = np.flatnonzero(ids == tok.eot_id).tolist() + [len(ids)]
    return [tok.decode(ids[a + 1:b]) for a, b in zip(bounds, bounds[1:])]


def test_prepare_trains_tokenizer_and_splits_by_document(tmp_path, corpus):
    path, docs = corpus
    out = prepare_dataset(path, tmp_path / "ds", vocab_size=300, val_fraction=0.1, seed=3)
    meta = load_meta(out)
    tok = Tokenizer.load(out / "tokenizer.json")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == 300
    assert meta["tokenizer_fingerprint"] == tok.fingerprint() and meta["eot_id"] == tok.eot_id
    train, val = read_split(out, "train", meta, tok), read_split(out, "val", meta, tok)
    assert len(val) == meta["val_documents"] == 3 and len(train) == meta["train_documents"] == 27
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert [d for d in docs if d in set(train)] == train  # order kept within a split
    assert meta["train_bytes"] == sum(len(d.encode()) for d in train)
    assert meta["val_bytes"] == sum(len(d.encode()) for d in val)
    assert meta["source"] == str(path) and meta["seed"] == 3 and meta["val_fraction"] == 0.1
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_tokenizer_is_trained_on_train_documents_only(tmp_path):
    docs = [f"common words number {i} " * 20 for i in range(19)] + ["zqxjv " * 2000]
    seed = next(s for s in range(100) if split_documents(docs, 0.05, s)[1] == [docs[-1]])
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare_dataset(path, tmp_path / "ds", vocab_size=300, seed=seed)
    assert len(Tokenizer.load(out).encode(" zqxjv")) > 1  # never saw the val document
    assert len(Tokenizer.train(docs, 300).encode(" zqxjv")) == 1  # would have, given all of them


def test_split_is_seeded():
    docs = make_docs(40)
    a, b = split_documents(docs, 0.25, seed=1), split_documents(docs, 0.25, seed=1)
    assert a == b and len(a[1]) == 10
    assert split_documents(docs, 0.25, seed=2)[1] != a[1]
    assert len(split_documents(docs[:3], 0.01, seed=0)[1]) == 1  # at least one val document
    with pytest.raises(PicochatError, match="between 0 and 1"):
        split_documents(docs, 1.5, seed=0)


def test_single_document_is_halved(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("First paragraph of a short note.\n\nSecond paragraph, which goes to one split.\n")
    meta = load_meta(prepare_dataset(path, tmp_path / "ds", tokenizer="gpt2"))
    assert meta["train_documents"] == meta["val_documents"] == 1
    with pytest.raises(PicochatError, match="cannot be split"):
        split_documents(["x"], 0.1, seed=0)


def test_given_tokenizers_and_uint32(tmp_path, corpus):
    path, docs = corpus
    gpt2 = Tokenizer.gpt2()
    meta = load_meta(prepare_dataset(path, tmp_path / "a", tokenizer="gpt2"))
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["eot_id"] == 50256
    big = Tokenizer(gpt2.ranks, {EOT: 70000}, gpt2.merges)  # ids beyond 65535 need uint32
    out = prepare_dataset(path, tmp_path / "b", tokenizer=big)
    meta = load_meta(out)
    assert meta["dtype"] == "uint32" and meta["eot_id"] == 70000
    assert sorted(read_split(out, "train", meta, big) + read_split(out, "val", meta, big)) == sorted(docs)


def test_load_meta_errors(tmp_path, corpus):
    with pytest.raises(PicochatError, match="does not exist.*picochat data prepare"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(PicochatError, match="not a prepared dataset.*picochat data prepare"):
        load_meta(tmp_path)
    out = prepare_dataset(corpus[0], tmp_path / "ds", tokenizer="gpt2")
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(PicochatError, match="train.bin is missing or not the size"):
        load_meta(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(PicochatError, match="damaged"):
        load_meta(out)


def test_default_dir_follows_picochat_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert default_dataset_dir(512) == tmp_path / "data" / "brown-v512-split-digits"


def test_ensure_default_dataset_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    d = ensure_default_dataset(1024)
    meta = load_meta(d)
    assert meta["source"] == "brown" and meta["vocab_size"] == 1024
    assert meta["train_documents"] + meta["val_documents"] == 500
    stamp = (d / "train.bin").stat().st_mtime_ns
    assert ensure_default_dataset(1024) == d and (d / "train.bin").stat().st_mtime_ns == stamp


def run_cli(argv):
    """The real `picochat` entry point (exit code; errors printed as one line)."""
    return main(argv)


def test_cli_prepare(tmp_path, corpus, capsys):
    out = tmp_path / "ds"
    assert run_cli(["data", "prepare", str(corpus[0]), "--out", str(out), "--vocab-size", "300",
                    "--val-fraction", "0.2", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["split", "documents", "tokens", "bytes", "bytes/token"]
    assert printed.splitlines()[1].split()[:2] == ["train", "24"] and "vocab 300" in printed
    assert load_meta(out)["val_documents"] == 6


def test_cli_default_out(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    assert run_cli(["data", "prepare", str(corpus[0]), "--tokenizer", "gpt2"]) == 0
    assert load_meta(tmp_path / "home" / "data" / "docs-gpt2")["vocab_size"] == 50257


def test_picochat_main_bad_source(tmp_path, capsys):
    from picochat.cli import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2 is not valid JSON" in err and err.count("\n") == 1


def test_cli_refuses_tokenizer_training_options_with_a_given_tokenizer(tmp_path, corpus, capsys):
    for flag in (["--vocab-size", "300"], ["--no-split-digits"], ["--split-digits"]):
        assert run_cli(["data", "prepare", str(corpus[0]), "--tokenizer", "gpt2", "--out", str(tmp_path / "x"),
                        *flag]) == 2
        assert "with --tokenizer the given tokenizer decides" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
