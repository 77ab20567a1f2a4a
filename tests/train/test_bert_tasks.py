"""`picochat bert`: masked-LM corruption, tagged rows, batches, and the three tasks end to end (tiny, slow)
with `picochat tag`, `classify` and `embed` reading the results."""
from __future__ import annotations

import json

import pytest
import torch

from picochat.errors import PicochatError
from picochat.train import bert_data as D


def test_mask_tokens_follows_bert():
    ids = torch.randint(len(D.SPECIALS), 1000, (200, 100))
    ids[:, 0], ids[:, -1], ids[:5, 50:] = D.CLS, D.SEP, D.PAD
    inputs, targets = D.mask_tokens(ids, 1000, torch.Generator().manual_seed(0))
    chosen = targets != D.IGNORE
    real = ids >= len(D.SPECIALS)
    assert not chosen[~real].any()  # [CLS], [SEP], [PAD] are never chosen
    assert abs(chosen.sum() / real.sum() - 0.15) < 0.01 and torch.equal(targets[chosen], ids[chosen])
    masked = (inputs == D.MASK) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02 and abs(kept.sum() / chosen.sum() - 0.1) < 0.02
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen positions change


@pytest.fixture(scope="module")
def tok():
    return D.train_wordpiece(["The old man saw the boats in the harbour .", "Dogs bark loudly at night ."] * 50, 200)


def test_tagged_rows_tag_every_word_once_and_pack_sentences(tok):
    index = {"NOUN": 0, "VERB": 1, "DET": 2, ".": 3, "ADJ": 4, "ADP": 5, "ADV": 6}
    s1 = [("The", "DET"), ("old", "ADJ"), ("man", "NOUN"), ("saw", "VERB"), ("boats", "NOUN"), (".", ".")]
    s2 = [("Dogs", "NOUN"), ("bark", "VERB"), ("loudly", "ADV"), (".", ".")]
    long = [("harbour", "NOUN")] * 30
    rows = D.tagged_rows(tok, [s1, s2, long, s1], index, max_len=16)
    assert all(len(ids) == len(lab) <= 16 and ids[0] == D.CLS and ids[-1] == D.SEP for ids, lab in rows)
    tags = [t for _, lab in rows for t in lab if t != D.IGNORE]
    assert tags == [index[t] for s in (s1, s2, long, s1) for _, t in s]  # each word once, in order
    first = rows[0][1]
    assert [t for t in first if t != D.IGNORE][:len(s1) + len(s2)] == [index[t] for _, t in s1 + s2]  # packed
    assert len(rows) >= 4  # the 30-word sentence was cut between words


def test_batches_are_pure_functions_of_step_and_micro():
    a, b = D.Batches(100, 8, 2, seed=3), D.Batches(100, 8, 2, seed=3)
    assert a.indices(5, 1) == b.indices(5, 1) and a.indices(5, 0) != a.indices(5, 1)
    epoch = [i for s in range(0, 100 // 16 + 1) for m in (0, 1) for i in a.indices(s, m)][:100]
    assert sorted(epoch) == list(range(100))  # one epoch visits every row once


def test_bad_options_are_refused_by_name():
    from picochat.train.bert import BertTrainConfig
    for kw, msg in (({"task": "ner"}, "task must be"), ({"task": "mlm", "init": "x"}, "--init"),
                    ({"max_len": 4}, "--max-len"), ({"n_embd": 30, "n_head": 4}, "multiple"),
                    ({"task": "pos", "passage_words": 50}, "--passage-words"),
                    ({"task": "pos", "init": "runs/mlm", "n_layer": 2}, "--n-layer shapes a new model")):
        with pytest.raises(PicochatError, match=msg):
            BertTrainConfig(**kw)


@pytest.mark.slow
def test_three_tasks_end_to_end_and_the_verbs_that_use_them(tmp_path, capsys):
    """A 1-layer model for a few dozen steps: every stage runs, writes transformers' format and results.json
    with the baseline beside the score; tag / classify / embed read the runs; mistakes are one-line errors."""
    from picochat.cli import main
    from picochat.encoder.cli import EmbedConfig, embed
    from picochat.encoder.tasks_cli import LabelConfig, classify, tag
    from picochat.train.bert import BertTrainConfig, train_bert
    small = dict(max_steps=30, eval_every=15, batch_size=8, progress=False)
    mlm = train_bert(BertTrainConfig(task="mlm", out_dir=str(tmp_path / "mlm"), vocab_size=1000, n_layer=1, n_head=2,
                                     n_embd=32, max_len=256, **small))
    assert mlm["baseline"]["name"] == "commonest token" and 0 <= mlm["test_accuracy"] <= 1
    pos = train_bert(BertTrainConfig(task="pos", init=str(tmp_path / "mlm"), out_dir=str(tmp_path / "pos"),
                                     lr=3e-3, **small))
    assert pos["test_accuracy"] > 0.3 and pos["baseline"]["accuracy"] > 0.9 and pos["test_n"] > 200_000
    with pytest.raises(PicochatError, match="longer than --max-len 128"):  # a cut passage is never scored
        train_bert(BertTrainConfig(task="genre", init=str(tmp_path / "mlm"), out_dir=str(tmp_path / "g0"), **small))
    with pytest.raises(PicochatError, match="--max-len 512 is more than"):
        train_bert(BertTrainConfig(task="genre", init=str(tmp_path / "mlm"), out_dir=str(tmp_path / "g1"),
                                   max_len=512, **small))
    genre = train_bert(BertTrainConfig(task="genre", init=str(tmp_path / "pos"), out_dir=str(tmp_path / "genre"),
                                       max_len=256, **small))
    assert set(json.loads((tmp_path / "genre" / "results.json").read_text())) >= {"test_accuracy", "baseline"}
    assert genre["documents"] == {"train": 349, "val": 51, "test": 100}
    capsys.readouterr()

    tagged = tag(LabelConfig(model=str(tmp_path / "pos"), texts=["The old man didn't see 3.5 boats.", ""]))
    assert [w for w, _ in tagged[0]] == ["The", "old", "man", "didn't", "see", "3.5", "boats", "."] and tagged[1] == []
    assert all(t in ("NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X")
               for _, t in tagged[0])
    probs = classify(LabelConfig(model=str(tmp_path / "genre"), texts=["The senator said on Tuesday."]))[0]
    assert set(probs) == {"fiction", "general", "learned", "press"} and abs(sum(probs.values()) - 1) < 1e-3
    vec = embed(EmbedConfig(model=str(tmp_path / "mlm"), texts=["the boats"]))["vectors"][0]
    assert len(vec) == 32
    capsys.readouterr()
    with pytest.raises(PicochatError, match="is a tagging model; `picochat classify` needs"):
        classify(LabelConfig(model=str(tmp_path / "pos"), texts=["x"]))
    with pytest.raises(PicochatError, match="reads at most 256"):
        classify(LabelConfig(model=str(tmp_path / "genre"), texts=["word " * 400]))
    assert main(["tag", str(tmp_path / "genre"), "hello"]) == 2
    assert "needs a `picochat bert pos` run" in capsys.readouterr().err

    # `picochat probe`: the mlm run's encoder frozen, a linear classifier on its (one) layer, then classify
    assert main(["probe", str(tmp_path / "mlm"), "--out-dir", str(tmp_path / "probe"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert res["layer"] == 1 and res["documents"] == {"train": 349, "val": 51, "test": 100}
    assert 0.25 < res["test_accuracy"] <= 1 and res["baseline"]["name"] == "TF-IDF + logistic regression"
    assert len(res["val_by_layer_and_l2"]) == 7
    probs = classify(LabelConfig(model=str(tmp_path / "probe"), texts=["The senator said on Tuesday."]))[0]
    assert set(probs) == {"fiction", "general", "learned", "press"} and abs(sum(probs.values()) - 1) < 1e-3
    with pytest.raises(PicochatError, match="reads at most 256"):
        classify(LabelConfig(model=str(tmp_path / "probe"), texts=["word " * 400]))
