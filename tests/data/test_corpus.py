"""The embedded Brown corpus and load_documents on text files, folders and JSONL."""
import re
from importlib import resources

import pytest

from picochat.data.corpus import brown_documents, load_documents, split_text
from picochat.errors import PicochatError

BROWN_GENRES = {"adventure", "belles_lettres", "editorial", "fiction", "government", "hobbies", "humor",
                "learned", "lore", "mystery", "news", "religion", "reviews", "romance", "science_fiction"}
# the commonest Brown tags; none may survive after a word
TAG = re.compile(r"[A-Za-z.,]/(?:at|nn|nns|np|in|jj|vbd|vbn|vbz|vb|rb|cc|cs|dt|pps|ppss|to|be|hvd|md|cd)"
                 r"(?:-tl|-hl|-nc|\$|\*)?(?=\s|$)")  # tags sat before whitespace


@pytest.fixture(scope="module")
def brown():
    return brown_documents()


def test_brown_shape(brown):
    assert len(brown) == 500
    assert len({d["id"] for d in brown}) == 500
    assert {d["genre"] for d in brown} == BROWN_GENRES
    text = "\n".join(d["text"] for d in brown)
    assert 5.8e6 < len(text) < 6.1e6 and text.isascii()
    assert 0.97e6 < len(text.split()) < 1.06e6
    size = resources.files("picochat.data").joinpath("brown.jsonl.xz").read_bytes().__len__()
    assert size < 2.5e6


def test_brown_is_clean_text(brown):
    text = "\n".join(d["text"] for d in brown)
    assert not TAG.search(text), TAG.search(text)
    assert "``" not in text and "''" not in text
    assert not re.search(r" [,.;:?!)](?!\d)", text)  # no space before closing punctuation (":35.3" is a time)
    assert not re.search(r"\( ", text)
    assert not re.search(r"([;?!])\1", text)  # the corpus's doubled sentence ends are gone
    first = brown[0]["text"]
    assert first.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's "
                            'recent primary election produced "no evidence" that any irregularities took place.')
    assert "\n\n" in first  # paragraphs kept


def test_load_documents_brown(brown):
    assert list(load_documents()) == [d["text"] for d in brown]
    assert next(load_documents("brown")) == brown[0]["text"]


def test_text_file_is_chunked_at_blank_lines(tmp_path):
    paragraphs = [f"Paragraph {i}:" + " word" * 200 for i in range(200)]  # ~200 KB
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    docs = list(load_documents(path))
    assert 5 <= len(docs) <= 12
    assert all(len(d) < 25_000 for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)


def test_split_text_keeps_code_and_crlf():
    code = "def f():\n    return 1\n"
    assert split_text(code) == ["def f():\n    return 1"]
    crlf = ("a" * 30 + "\r\n\r\n") * 2
    assert split_text(crlf, chunk_chars=10) == ["a" * 30, "a" * 30]


def test_folder_is_recursive_sorted_and_skips_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.jsonl").write_text('{"text": "third"}\n')
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x").write_text("hidden too")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    assert list(load_documents(tmp_path)) == ["first", "second", "third"]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\nlines"}\n{"text": "   "}\n'
                    '{"text": "lone \\ud800 surrogate"}\n')
    assert list(load_documents(path)) == ["one", "two\nlines", "lone \ufffd surrogate"]


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", "no text found"),
    ("blank.txt", b"  \n\n\t\n", "no text found"),
    ("latin1.txt", "caf\u00e9 ok".encode("latin-1"), r"latin1\.txt is not UTF-8.*byte offset 3.*iconv"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl line 2 is not valid JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext\.jsonl line 2 has no string \"text\""),
    ("list.jsonl", b'["text"]\n', r"line 1 has no string"),
])
def test_bad_inputs(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PicochatError, match=match) as e:
        list(load_documents(path))
    assert "\n" not in str(e.value)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(PicochatError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")
    with pytest.raises(PicochatError, match="no text found"):
        list(load_documents(tmp_path))
