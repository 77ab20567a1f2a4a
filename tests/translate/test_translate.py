"""The translator's data (held out by number), its CLI (errors in one line) and a short end-to-end run."""
import json

import pytest

from picochat.cli import main
from picochat.errors import PicochatError
from picochat.translate.cli import TranslateConfig, translate
from picochat.translate.data import (PairTensors, Vocab, build_vocabs, english, french, join_target, pairs_for,
                                     source_words, split_numbers, target_words)
from picochat.translate.train import TranslateTrainConfig, load_translator, translate_train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_is_disjoint_deterministic_and_complete():
    s = split_numbers(9999, 0.1, 0.05, seed=0)
    train, val, test = set(s["train"]), set(s["val"]), set(s["test"])
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(10000))
    assert (len(test), len(val), len(train)) == (1000, 500, 8500)
    assert split_numbers(9999, 0.1, 0.05, seed=0) == s and split_numbers(9999, 0.1, 0.05, seed=1)["test"] != s["test"]
    with pytest.raises(PicochatError, match="fraction"):
        split_numbers(9999, 0.5, 0.45)


def test_words_round_trip_and_vocab_covers_held_out_numbers():
    s = split_numbers()
    vocabs = build_vocabs(pairs_for(s["train"]), shared=False)
    held_out = pairs_for(s["test"] + s["val"])
    PairTensors(held_out, vocabs)  # every held-out word is known: encoding raises otherwise
    for en, fr in held_out:
        assert join_target(target_words(fr)) == fr
    assert target_words(french(97)) == ["quatre", "-", "vingt", "-", "dix", "-", "sept"]
    assert source_words(english(4207)) == "four thousand two hundred and seven".split()
    assert source_words("Ninety-Nine") == ["ninety", "nine"]
    assert len(vocabs.target) == 3 + 28 and len(vocabs.source) == 3 + 31
    shared = build_vocabs(pairs_for(s["train"]), shared=True)
    assert shared.source is shared.target and len(shared.source) == 3 + 31 + 28 - 1  # "six" is in both


def test_unknown_words_are_refused_by_name():
    v = Vocab(["one", "two"])
    assert v.encode(["two", "one"], bos=True) == [1, 4, 3, 2]
    with pytest.raises(PicochatError, match=r"unknown words 'eleventy', 'zillion'"):
        v.encode(["one", "eleventy", "zillion", "eleventy"])


@pytest.mark.parametrize("shared,tied", [(True, True), (True, False), (False, True), (False, False)])
def test_checkpoint_round_trip_with_shared_and_tied_matrices(tmp_path, shared, tied):
    import torch
    from picochat.model.seq2seq import Seq2Seq, Seq2SeqConfig
    from picochat.translate.train import save_translator
    pairs = pairs_for([1, 21, 97, 4207])
    vocabs = build_vocabs(pairs, shared)
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(src_vocab_size=len(vocabs.source), tgt_vocab_size=len(vocabs.target), n_embd=16,
                                  n_head=2, shared_vocab=shared, tie_embeddings=tied)).eval()
    save_translator(model, vocabs, tmp_path / "ckpt")
    loaded, v2, _ = load_translator(tmp_path / "ckpt")
    batch = PairTensors(pairs, vocabs).batch([0, 1, 2, 3])
    assert torch.equal(model(*batch)[0], loaded(*batch)[0]) and v2.to_json() == vocabs.to_json()
    assert (loaded.lm_head.weight is loaded.tgt_emb.weight) == tied
    assert (loaded.src_emb.weight is loaded.tgt_emb.weight) == shared


def one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert match.lower() in err[0].lower(), err[0]


@pytest.mark.parametrize("args,match", [
    (["--max-number", "200", "--beam", "29"], "--beam 29 is wider than the target vocabulary allows (its 27 words "
                                              "and EOS): give --beam 28 or less"),
    (["--max-number", "50"], "the held-out numbers use words training never sees (twelve, douze): "
                             "raise --max-number or change --split-seed"),
    (["--max-number", "31"], "words training never sees (nineteen)"),  # a validation number's, the test's are known
    (["--max-number", "389", "--test-fraction", "0.3", "--split-seed", "4", "--block-size", "10"],
     "--block-size 10 is shorter than the longest sentence (11 tokens"),  # a test number's: train's and val's fit
    (["--beam", "1", "--length-penalty", "0.5"], "--length-penalty ranks beam search hypotheses; give --beam 2"),
])
def test_mistakes_are_refused_before_training(tmp_path, capsys, args, match):
    """What would only fail at the final evaluation (after all the training) is refused before the first step."""
    out = tmp_path / "run"
    one_line_error(capsys, ["translate", "train", "--out-dir", str(out), *args], match)
    assert not out.exists()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A translator trained for a few seconds (tiny, far from good): for the plumbing, not the quality."""
    out = tmp_path_factory.mktemp("translate") / "run"
    cfg = TranslateTrainConfig(out_dir=str(out), max_steps=12, batch_size=32, n_embd=32, n_head=2, eval_every=6,
                               ckpt_every=6, warmup_steps=2, beam=2, progress=False, dtype="fp32")
    return out, translate_train(cfg)


def test_short_run_end_to_end_and_resume(short_run, capsys):
    out, results = short_run
    assert (out / "attention.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    assert json.loads((out / "results.json").read_text()) == results
    assert results["test_numbers"] == 1000 and 0 <= results["greedy_exact_match"] <= 1
    assert 0 <= results["beam2_exact_match"] <= 1
    ckpt = out / (out / "latest").read_text().strip()
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "state.json"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    # through the CLI function, and through `picochat translate`
    got = translate(TranslateConfig(model=str(out), texts=["twenty-one", "four thousand two hundred and seven"]))
    assert len(got) == 2 and all(isinstance(t, str) for t in got)
    assert capsys.readouterr().out.splitlines() == got
    assert main(["translate", str(ckpt), "twenty-one", "--beam", "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["source"] == "twenty-one" and isinstance(line["translation"], str)
    model, vocabs, _ = load_translator(out)
    assert model.config.n_embd == 32 and len(vocabs.target) == model.config.tgt_vocab_size
    # resuming a finished run trains nothing more and measures the same model again
    again = translate_train(TranslateTrainConfig(out_dir=str(out), max_steps=12, batch_size=32, n_embd=32, n_head=2,
                                                 eval_every=6, ckpt_every=6, warmup_steps=2, beam=2, progress=False,
                                                 dtype="fp32", resume=True))
    assert again["greedy_exact_match"] == results["greedy_exact_match"]
    with pytest.raises(PicochatError, match="another model"):
        translate_train(TranslateTrainConfig(out_dir=str(out), max_steps=14, n_embd=64, n_head=2, progress=False,
                                             resume=True))


def test_cli_errors_are_one_line(short_run, tmp_path, capsys):
    out, _ = short_run
    one_line_error(capsys, ["translate", str(tmp_path / "nowhere"), "one"], "no translator at")
    one_line_error(capsys, ["translate", str(out), "one hundred and eleventy"], "unknown word 'eleventy'")
    one_line_error(capsys, ["translate", str(out), "eleventy", "zillion"], "'eleventy', 'zillion'")
    one_line_error(capsys, ["translate", str(out)], "give English number words")
    one_line_error(capsys, ["translate", str(out), "one", " "], "text 2 is empty")
    one_line_error(capsys, ["translate", str(out), "one", "--beam", "0"], "--beam")
    one_line_error(capsys, ["translate", str(out), "one", "--length-penalty", "0.5"], "give --beam 2")
    one_line_error(capsys, ["translate", "train", "--out-dir", str(tmp_path / "r"), "--n-embd", "30"], "n_embd")
    one_line_error(capsys, ["translate", "train", "--out-dir", str(tmp_path / "r"), "--block-size", "8"],
                   "--block-size 8 is shorter")
    # a picochat GPT checkpoint is not a translator
    import torch
    from picochat.checkpoints.io import save_model
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    torch.manual_seed(0)
    gpt = save_model(GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)), tmp_path / "gpt")
    one_line_error(capsys, ["translate", str(gpt), "one"], "not a translator checkpoint")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["translate", str(tmp_path / "empty"), "one"], "is not a translator (no config.json")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("checkpoints/step_0000009\n")  # points to nothing
    one_line_error(capsys, ["translate", str(tmp_path / "run"), "one"], "missing")


@pytest.mark.slow
def test_a_small_translator_learns_held_out_numbers(tmp_path, capsys):
    """~30 s: a d=64 model, 900 steps. Held-out numbers (never trained on, in any form) come out right."""
    out = tmp_path / "run"
    res = translate_train(TranslateTrainConfig(out_dir=str(out), max_steps=900, batch_size=64, n_embd=64, lr=2e-3,
                                               warmup_steps=50, dropout=0.0, eval_every=900, ckpt_every=900,
                                               beam=3, progress=False))
    assert res["greedy_exact_match"] >= 0.95 and res["beam3_exact_match"] >= 0.95, res
    test = split_numbers()["test"]
    n = next(k for k in test if k > 1000 and "-" in french(k))  # a held-out number with a hyphenated French part
    capsys.readouterr()
    assert main(["translate", str(out), english(n), "four thousand two hundred and seven", "--beam", "3"]) == 0
    got = capsys.readouterr().out.splitlines()
    assert got == [french(n), "quatre mille deux cent sept"], (n, got)
