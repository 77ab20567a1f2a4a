"""Bad input anywhere in the CLI gets one line that says what to fix (exit 2), never a traceback."""
import json
import shutil

import pytest

from picochat.cli import main


def one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith("error:") and "Traceback" not in "\n".join(err)
    assert match.lower() in err[-1].lower(), err[-1]
    return err[-1]


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n\n")
    one_line_error(capsys, ["pretrain", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "r")], "empty")


def test_non_utf8_corpus(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    one_line_error(capsys, ["pretrain", str(tmp_path / "latin1.txt"), "--out-dir", str(tmp_path / "r")], "utf-8")


def test_vocab_too_small_for_special_tokens(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    one_line_error(capsys, ["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "200",
                            "--out", str(tmp_path / "t.json")], "vocab")


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--lr", "-1"), ("--max-steps", "0")])
def test_absurd_training_parameters(tmp_path, capsys, tiny_dataset, flag, value):
    one_line_error(capsys, ["pretrain", str(tiny_dataset), "--out-dir", str(tmp_path / "r"), flag, value],
                   flag.lstrip("-"))


def test_resume_with_another_architecture(tiny_run, tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    one_line_error(capsys, ["pretrain", str(tiny_dataset), "--out-dir", str(run), "--resume", "--n-layer", "3",
                            "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--max-steps", "200"],
                   "different model")


def test_checkpoint_from_another_architecture(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg_path = run / (run / "latest").read_text().strip() / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["n_embd"] = 96
    cfg_path.write_text(json.dumps(cfg))
    one_line_error(capsys, ["generate", str(run), "--max-tokens", "2"], "shape")


def test_corrupt_checkpoint_file(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / (run / "latest").read_text().strip() / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(capsys, ["generate", str(run), "--max-tokens", "2"], "corrupt")
    weights.write_bytes(b"\x00" * 7)
    one_line_error(capsys, ["generate", str(run), "--max-tokens", "2"], "corrupt")


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line_error(capsys, ["generate", str(tmp_path)], "import")
    one_line_error(capsys, ["generate", str(tmp_path / "missing")], "no checkpoint")


@pytest.mark.parametrize("verb", __import__("picochat.cli", fromlist=["VERBS"]).VERBS)
def test_every_verb_prints_its_help(verb, capsys):
    """--help renders for every verb (argparse %-formats help text: a docstring's bare "%" once crashed one)."""
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "usage: picochat" in capsys.readouterr().out
