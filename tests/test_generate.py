"""`picochat generate` on a model trained in the test: it learned the corpus, and sampling is seeded."""
import io
import json
import math

import pytest

from picochat.cli import main
from picochat.generate import GenerateConfig, generate

VERBS = {"sees", "likes", "follows", "finds", "paints", "remembers", "crosses"}


def test_training_learned_and_greedy_continuation_follows_the_pattern(tiny_run):
    rows = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert train[0] > 3 * train[-1]  # the loss fell a long way
    assert val[-1] < 0.2 * math.log(320)  # and learns the pattern of the corpus
    assert (tiny_run / "loss.png").stat().st_size > 10_000
    out = generate(GenerateConfig(checkpoint=str(tiny_run), prompt="The cat", max_tokens=8, temperature=0),
                   out=io.StringIO())
    assert out[0].split()[0] in VERBS


def test_seeded_sampling_is_reproducible(tiny_run):
    cfg = GenerateConfig(checkpoint=str(tiny_run), prompt="A dog", max_tokens=20, temperature=1.0, seed=3,
                         top_p=0.9)
    a, b = generate(cfg, out=io.StringIO()), generate(cfg, out=io.StringIO())
    assert a == b
    cfg.seed = 4
    cfg.num_samples = 3
    assert len(set(generate(cfg, out=io.StringIO()))) > 1


def test_generate_quantized_int8_follows_the_pattern_too(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "The cat", "--max-tokens", "8", "--temperature", "0",
                 "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The cat") and out.split()[2] in VERBS


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int4"]])
def test_generate_compiled_decode_step_gives_the_plain_text(tiny_run, capsys, quantize):
    """--fast compile (engine/compiled.py, with int4 weights too) prints what --fast plain prints."""
    args = ["generate", str(tiny_run), "--prompt", "The cat", "--max-tokens", "24", "--temperature", "0", *quantize]
    assert main(args + ["--fast", "plain"]) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--fast", "compile"]) == 0
    assert capsys.readouterr().out == plain and plain.split()[2] in VERBS


def test_generate_cli_streams_text(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "The river", "--max-tokens", "10", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The river")


@pytest.mark.parametrize("args,match", [
    (["--max-tokens", "0"], "max-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--prompt", "the cat " * 200], "context"),
])
def test_generate_bad_input_is_one_line(tiny_run, capsys, args, match):
    assert main(["generate", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and "\n" not in err
