"""Tokenizer: GPT-2 ids against independent oracles, trained BPE parity (tiktoken vs HF), CLI."""
import json
import lzma
import sys
from importlib import resources

import pytest
import tiktoken
from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

from picochat.data.corpus import brown_documents
from picochat.cli import main
from picochat.errors import PicochatError
from picochat.tokenizer import DIGITS_PATTERN, GPT2_PATTERN, SPECIAL_TOKENS, Tokenizer

GPT2_REGEX = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

MIXED = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see, they're gone.\n"
    "Le cœur a ses raisons que la raison ne connaît point. À bientôt, garçon ! Ça va? «Où es-tu?»\n"
    "Emoji: 😀 🎉 👍🏽 family 👩‍👩‍👧‍👦 flag 🇫🇷 and CJK 日本語のテキスト, 中文, 한국어.\n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif (a && b) { return {\"k\": [1, 2]}; }\n"
    "Whitespace   runs\t\t and trailing   \r\nwindows line\r\nnull\x00byte and    \n\n\n   end"
)
ROUND_TRIP = [
    "", "a", " ", "hello world", "  leading and trailing  ", "\n\n\n", "\r\n\r\n", "\x00\x00",
    "naïve café déjà vu, Ærøskøbing", "👩‍👩‍👧‍👦🏳️‍🌈🇯🇵", "日本語のテキスト", "x" * 5000,
    "for i in range(10):\n\tprint(i)  # \\n ok", "<|endoftext|>", "<|user_start|>hi<|user_end|>",
    "\u200b\u200d\ufeff", "ℌ𝔢𝔩𝔩𝔬 𝟙𝟚𝟛", "a\tb\u00a0c\u2028d", MIXED,
]


def gpt2_file_text(name: str) -> str:
    raw = resources.files("picochat.assets").joinpath("gpt2", name).read_bytes()
    return lzma.decompress(raw).decode("utf-8")


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    for name in ("encoder.json", "vocab.bpe"):
        (d / name).write_text(gpt2_file_text(name + ".xz"), encoding="utf-8")
    return d / "encoder.json", d / "vocab.bpe"


@pytest.fixture(scope="module")
def oracle_tiktoken(gpt2_files):
    """tiktoken built here from the data-gym files, the way tiktoken_ext does it, not with our code."""
    encoder_json, vocab_bpe = gpt2_files
    rank_to_intbyte = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    data_gym_byte_to_byte = {chr(b): b for b in rank_to_intbyte}
    n = 0
    for b in range(256):
        if b not in rank_to_intbyte:
            rank_to_intbyte.append(b)
            data_gym_byte_to_byte[chr(256 + n)] = b
            n += 1
    decode = lambda s: bytes(data_gym_byte_to_byte[c] for c in s)  # noqa: E731
    ranks = {bytes([b]): i for i, b in enumerate(rank_to_intbyte)}
    for line in vocab_bpe.read_text("utf-8").splitlines()[1:]:
        if line:
            first, second = line.split()
            ranks[decode(first) + decode(second)] = len(ranks)
    encoder = json.loads(encoder_json.read_text("utf-8"))
    assert {decode(k): v for k, v in encoder.items() if k != "<|endoftext|>"} == ranks
    return tiktoken.Encoding("gpt2-oracle", pat_str=GPT2_REGEX, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def brown_slice():
    return [d["text"] for d in brown_documents()[::25]]  # 20 documents across all genres


@pytest.fixture(scope="module")
def trained(brown_slice):
    return Tokenizer.train(brown_slice, 1000)


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.eot_id == 50256 and gpt2.vocab_size == 50257
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.decode([15496, 11, 995, 0]) == "Hello, world!"


def test_gpt2_matches_independent_tiktoken(gpt2, oracle_tiktoken, brown_slice):
    for text in [MIXED, brown_slice[0], *ROUND_TRIP]:
        assert gpt2.encode(text) == oracle_tiktoken.encode_ordinary(text)
    assert gpt2.encode(MIXED + "<|endoftext|>", allowed_special="all") == \
        oracle_tiktoken.encode(MIXED + "<|endoftext|>", allowed_special="all")


def test_gpt2_matches_hf_tokenizers(gpt2, gpt2_files, brown_slice):
    hf = HFTokenizer(models.BPE.from_file(str(gpt2_files[0]), str(gpt2_files[1])))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in [MIXED, brown_slice[1]]:
        assert gpt2.encode(text) == hf.encode(text).ids


def test_from_gpt2_files_equals_packaged(gpt2, gpt2_files):
    assert Tokenizer.from_gpt2_files(*gpt2_files).fingerprint() == gpt2.fingerprint()
    assert Tokenizer.load("gpt2") is gpt2


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(trained, gpt2, text):
    for tok in (trained, gpt2):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_trained_layout(trained):
    assert trained.vocab_size == 1000
    assert [trained.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    specials = trained.special_tokens
    assert list(specials) == SPECIAL_TOKENS
    assert sorted(specials.values()) == list(range(1000 - len(SPECIAL_TOKENS), 1000))
    assert trained.eot_id == 1000 - len(SPECIAL_TOKENS)
    for name, i in specials.items():
        assert trained.token_to_id(name) == i and trained.id_to_token(i) == name
    assert trained.token_to_id(" the") == trained.encode(" the")[0]


def test_trained_tiktoken_equals_hf(trained, brown_slice):
    """Same tokens as HF's own trainer + BPE (independent of our id layout), and same ids as the
    HF object built from our tokenizer.json."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([  # GPT-2's regex with one pre-token per digit
        pre_tokenizers.Split(Regex(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator(brown_slice, trainers.BpeTrainer(
        vocab_size=1000 - len(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ours = trained.to_hf()
    to_bytes = _byte_alphabet()
    # HF matches special-token strings even in plain text (we do not), so leave those out
    for text in [t for t in [MIXED, *ROUND_TRIP, brown_documents()[7]["text"]] if "<|" not in t]:
        ids = trained.encode(text)
        assert ids == ours.encode(text).ids
        hf_tokens = [bytes(to_bytes[c] for c in hf.id_to_token(i)) for i in hf.encode(text).ids]
        assert [trained.token_bytes(i) for i in ids] == hf_tokens


def test_split_digits(brown_slice, trained, tmp_path):
    """Trained tokenizers give every digit a token of its own; --no-split-digits keeps GPT-2's runs."""
    text = "In 1961, 23 + 45 = 68 and 12345 people paid $3.50 (x2)."
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    digit_tokens = [trained.token_bytes(i) for i in ids if any(c.isdigit() for c in trained.decode([i]))]
    assert digit_tokens == [c.encode() for c in text if c.isdigit()]  # each digit alone, nothing attached
    merged = Tokenizer.train(brown_slice + ["1961 1961 1961 1961"] * 50, 1000, split_digits=False)
    assert merged.pattern == GPT2_PATTERN and trained.pattern == DIGITS_PATTERN
    assert len(merged.encode("1961")) == 1
    loaded = Tokenizer.load(trained.save(tmp_path / "t.json"))  # the pattern survives tokenizer.json
    assert loaded.pattern == DIGITS_PATTERN and loaded.encode(text) == ids
    assert HFTokenizer.from_file(str(tmp_path / "t.json")).encode(text).ids == ids


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable character -> byte table, rebuilt here rather than imported."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in bs]
    for b in range(256):
        if b not in bs:
            chars.append(chr(256 + len(bs) - 188))
            bs.append(b)
    return dict(zip(chars, bs))


def test_special_strings_are_plain_text(trained, gpt2):
    for tok in (trained, gpt2):
        text = "a <|endoftext|> b <|user_start|>"
        assert not set(tok.encode(text)) & set(tok.special_tokens.values())
        assert not set(tok.encode_batch([text])[0]) & set(tok.special_tokens.values())
    ids = trained.encode(text, allowed_special="all")
    assert trained.eot_id in ids and trained.token_to_id("<|user_start|>") in ids
    ids = trained.encode(text, allowed_special={"<|user_start|>"})
    assert trained.eot_id not in ids and trained.token_to_id("<|user_start|>") in ids
    assert trained.decode(ids) == text


def test_encode_batch_matches_encode(trained, brown_slice):
    assert trained.encode_batch(brown_slice[:5], num_threads=2) == [trained.encode(t) for t in brown_slice[:5]]


def test_save_load_identical(trained, tmp_path):
    path = trained.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint() == trained.fingerprint()
    assert loaded.special_tokens == trained.special_tokens
    assert loaded.encode(MIXED) == trained.encode(MIXED)
    trained.save(tmp_path)  # a folder gets tokenizer.json
    assert Tokenizer.load(tmp_path).fingerprint() == trained.fingerprint()
    assert HFTokenizer.from_file(str(path)).encode(MIXED).ids == trained.encode(MIXED)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_saved_file_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(trained.save(tmp_path / "t.json")))
    assert fast(MIXED)["input_ids"] == trained.encode(MIXED)


def test_fingerprint_distinguishes(trained, gpt2):
    assert len(trained.fingerprint()) == 16 and trained.fingerprint() != gpt2.fingerprint()
    assert gpt2.add_special_tokens(["<|user_start|>"]).fingerprint() != gpt2.fingerprint()


def test_add_special_tokens_to_gpt2(gpt2):
    chat = gpt2.add_special_tokens(SPECIAL_TOKENS)
    assert chat.special_tokens["<|endoftext|>"] == 50256
    assert chat.token_to_id("<|system_start|>") == 50257 and chat.vocab_size == 50263
    assert chat.encode("Hello, world!") == [15496, 11, 995, 0]


def test_too_small_vocab():
    with pytest.raises(PicochatError, match=r"at least 263|263 or more"):
        Tokenizer.train(["hello"], 262)
    assert Tokenizer.train(["hello hello"], 263).vocab_size == 263


def test_lone_surrogates_become_replacement_char(trained, gpt2):
    for tok in (trained, gpt2):
        assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
        assert tok.decode(tok.encode_batch(["x\udfffy"])[0]) == "x\ufffdy"
    assert Tokenizer.train(["bad \ud800 text", "good text"], 300).vocab_size <= 300


def test_decode_invalid_utf8_never_raises(trained, gpt2):
    assert trained.decode([0xE6]) == "\ufffd"  # first byte of a 3-byte character, alone
    emoji = gpt2.encode("😀")
    assert len(emoji) > 1 and gpt2.decode(emoji[:1]) == "\ufffd"
    assert gpt2.decode(emoji) == "😀"
    with pytest.raises(PicochatError, match="not in this tokenizer"):
        trained.decode([5, 1000])


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a valid tokenizer.json"),
    ('{"model": {"type": "WordPiece", "vocab": {}}}', "only BPE"),
    ('{"model": {"type": "BPE"}}', "not a valid tokenizer.json"),
])
def test_load_bad_files(tmp_path, content, match):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(PicochatError, match=match):
        Tokenizer.load(tmp_path)


def test_load_missing(tmp_path):
    with pytest.raises(PicochatError, match="picochat tokenizer train"):
        Tokenizer.load(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------- CLI
def run_cli(argv):
    """The real `picochat` entry point (exit code; errors printed as one line)."""
    return main(argv)


def test_cli_train_encode_show(tmp_path, capsys, brown_slice):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(brown_slice[:3]))
    out = tmp_path / "tok.json"
    assert run_cli(["tokenizer", "train", str(src), "--vocab-size", "400", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "400-token BPE" in printed and "bytes/token" in printed and out.is_file()

    assert run_cli(["tokenizer", "encode", "--tokenizer", "gpt2", "Hello, world!"]) == 0
    assert capsys.readouterr().out.strip() == "15496 11 995 0"
    assert run_cli(["tokenizer", "encode", "--tokenizer", str(out), "--json", "--special", "hi<|endoftext|>"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == Tokenizer.load(out).encode("hi<|endoftext|>", allowed_special="all")

    assert run_cli(["tokenizer", "show", "--tokenizer", "gpt2", "Hello, world! 😀"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Hello|,| world|!| 😀"  # the emoji's byte tokens are shown as one piece
    assert lines[1].startswith("6 tokens")


def test_cli_show_colour_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_cli(["tokenizer", "show", "Hello, world!"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[48;5;" in out and "|" not in out.splitlines()[0]
    assert run_cli(["tokenizer", "show", "--no-color", "Hello"]) == 0
    assert "\x1b[" not in capsys.readouterr().out


def test_cli_reads_stdin(capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Hello, world!".encode())))
    assert run_cli(["tokenizer", "encode"]) == 0
    assert capsys.readouterr().out.strip() == "15496 11 995 0"


def test_picochat_main_bad_input(tmp_path, capsys):
    from picochat.cli import main
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "missing.json"), "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no tokenizer at") and err.count("\n") == 1
    assert main(["tokenizer", "train", "--vocab-size", "100", "--out", str(tmp_path / "t.json")]) == 2
    assert "263" in capsys.readouterr().err
