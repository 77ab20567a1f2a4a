"""The tagged Brown corpus: the universal tag map, the readers, the split, passages and baselines."""
import re
from collections import Counter
from importlib import resources

import pytest

from picochat.data import brown_tags as bt
from picochat.data.corpus import brown_documents
from picochat.errors import PicochatError


@pytest.fixture(scope="module")
def brown_tagged():
    return bt.load_tagged("brown")


@pytest.fixture(scope="module")
def tagged():
    return bt.load_tagged()


def test_every_corpus_tag_is_in_the_reference_map(brown_tagged):
    tags = Counter(t for d in brown_tagged for s in d["sentences"] for _, t in s)
    # the reference lists exactly the corpus's tags: a tag it lacks would be guessed, not looked up
    assert set(tags) - set(bt.BROWN_TO_UNIVERSAL) == set(), "Brown tags missing from the map"
    assert set(bt.BROWN_TO_UNIVERSAL) == set(tags) and len(tags) == 472
    assert len(bt.UNIVERSAL_TAGS) == 12 and set(bt.BROWN_TO_UNIVERSAL.values()) == set(bt.UNIVERSAL_TAGS)
    assert sum(tags.values()) == 1_161_192


@pytest.mark.parametrize("brown, expected", [
    ("at", "DET"), ("nn-tl", "NOUN"), ("vbd", "VERB"), ("fw-nn", "X"), (".", "."), ("cd", "NUM"),
    ("cc", "CONJ"), ("in", "ADP"), ("rp", "PRT"), ("to", "PRT"), ("np$", "NOUN"), ("do*", "VERB"),
    ("pp$", "DET"), ("*", "ADV"), ("cs", "ADP"), ("ppss", "PRON"), ("md", "VERB"), ("nn-tl-hl", "NOUN"),
    ("``", "."), ("NN-TL", "NOUN"),
    # the reference maps pronoun + verb contractions ("I'm", "it's") to PRT, not to their first part
    ("ppss+bem", "PRT"), ("pps+bez", "PRT"), ("vb+ppo", "VERB"), ("do+ppss", "X"),
    # not in the table: markers stripped as the table does for the tags it lists; fw-* is X
    ("jjs-nc", "ADJ"), ("vbz-tl-hl", "VERB"), ("fw-vbz-tl", "X"),
])
def test_hand_checked_mappings(brown, expected):
    assert bt.universal(brown) == expected


def test_unknown_tag_is_refused():
    with pytest.raises(ValueError, match="zz"):
        bt.universal("zz")
    with pytest.raises(PicochatError):
        bt.load_tagged("penn")


def test_tagged_file_round_trips(brown_tagged, tagged):
    assert len(brown_tagged) == len(tagged) == 500
    first = tagged[0]["sentences"][0]
    assert first[:4] == [("The", "DET"), ("Fulton", "NOUN"), ("County", "NOUN"), ("Grand", "ADJ")]
    assert brown_tagged[0]["sentences"][0][:2] == [("The", "at"), ("Fulton", "np-tl")]
    lines = bt._tagged_lines()
    for (_, _, sentences), doc in zip(lines, brown_tagged):
        assert [" ".join(f"{w}/{t}" for w, t in s) for s in doc["sentences"]] == list(sentences)
    words = {w for d in brown_tagged for s in d["sentences"] for w, _ in s}
    assert "1/2" in words and "don't" in words  # the tag is after the last slash
    assert all(t in bt.UNIVERSAL_TAGS for d in tagged for s in d["sentences"] for _, t in s)
    size = len(resources.files("picochat.data").joinpath(bt.TAGGED_RESOURCE).read_bytes())
    assert size < 2.5e6


def test_tagged_agrees_with_untagged(brown_tagged):
    untagged = brown_documents()
    assert [(d["id"], d["genre"]) for d in brown_tagged] == [(d["id"], d["genre"]) for d in untagged]
    # printed with the pretraining text's own typography, the words are the same words; the
    # untagged file keeps a period doubled where a paragraph break split "U.N.F.P." from its "."
    def norm(text):
        return re.sub(r"\.+", ".", "".join(text.split()))
    for t, u in zip(brown_tagged, untagged):
        assert norm(bt.detokenize([p for s in t["sentences"] for p in s])) == norm(u["text"]), t["id"]


def test_genre_groups_cover_the_corpus(tagged):
    assert set(bt.GENRE_GROUPS) == {d["genre"] for d in tagged}
    assert set(bt.GENRE_GROUPS.values()) == {"press", "general", "learned", "fiction"}
    by_letter = {(d["id"][1], bt.GENRE_GROUPS[d["genre"]]) for d in tagged}
    assert {g for letter, g in by_letter if letter in "abc"} == {"press"}
    assert {g for letter, g in by_letter if letter in "defg"} == {"general"}
    assert {g for letter, g in by_letter if letter in "hj"} == {"learned"}
    assert {g for letter, g in by_letter if letter in "klmnpr"} == {"fiction"}


def test_split_is_by_document_deterministic_and_stratified(tagged):
    train, val, test = bt.split_documents(tagged)
    ids = [{d["id"] for d in part} for part in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 500
    assert (len(train), len(val), len(test)) == (349, 51, 100)
    again = bt.split_documents(list(reversed(tagged)))  # input order does not matter
    assert [{d["id"] for d in part} for part in again] == ids
    assert {d["id"] for d in bt.split_documents(tagged, seed=1)[2]} != ids[2]
    for part, fraction in ((test, 0.2), (val, 0.1)):
        counts = Counter(bt.GENRE_GROUPS[d["genre"]] for d in part)
        totals = Counter(bt.GENRE_GROUPS[d["genre"]] for d in tagged)
        assert set(counts) == set(totals)
        assert all(abs(counts[g] - fraction * totals[g]) <= 1 for g in totals)
    with pytest.raises(PicochatError, match="too few"):
        bt.split_documents(tagged[:2])


def _sentence(n_words):
    return [(f"w{i}", "NOUN") for i in range(n_words)] + [(".", ".")]


def test_passages_respect_the_word_budget(tagged):
    doc = {"sentences": [_sentence(n) for n in (30, 40, 50, 120, 10, 10)]}
    cut = bt.passages(doc, words=100)
    assert [len(p.split()) for p in cut] == [70, 50, 120]  # the 20-word tail is under half the budget
    assert cut[0].endswith("w39.") and " ." not in cut[0]
    for doc in tagged[::50]:
        longest = max(sum(bt._is_word(w) for w, _ in s) for s in doc["sentences"])
        for words in (100, 200):
            cut = bt.passages(doc, words)
            counts = [sum(bt._is_word(w) for w in p.split()) for p in cut]
            assert all(n <= max(words, longest) for n in counts), (doc["id"], counts)
            assert counts[-1] >= words // 2 and sum(counts) / len(counts) > 0.75 * words
            assert "``" not in " ".join(cut) and "''" not in " ".join(cut)
            total = sum(bt._is_word(w) for s in doc["sentences"] for w, _ in s)
            assert sum(counts) >= total - words  # only a short tail is dropped


def test_most_frequent_tagger_rules():
    sentences = [[("The", "DET"), ("dog", "NOUN"), ("is", "VERB"), ("running", "VERB"), ("1961", "NUM")],
                 [("the", "DET"), ("jumping", "VERB"), ("dog", "NOUN"), ("dog", "VERB")]]
    tag = bt.most_frequent_tagger([{"genre": "news", "sentences": sentences}])
    assert tag("dog") == "NOUN"        # most frequent of NOUN, NOUN, VERB
    assert tag("Dog") == "NOUN"        # lowercase fallback
    assert tag("singing") == "VERB"    # unseen: like the hapaxes ending in -ing
    assert tag("1984") == "NUM"        # unseen: like the hapaxes with digits
    assert tag("Zanzibar") == "NOUN"   # unseen shape


def test_baselines_on_a_slice(tagged):
    train, _, test = bt.split_documents(tagged[::4], test_fraction=0.2, val_fraction=0.0)
    accuracy = bt.most_frequent_tag_baseline(train, test)
    assert 0.85 < accuracy < 0.99
    genre = bt.tfidf_genre_baseline(bt.labelled_passages(train, 200), bt.labelled_passages(test, 200))
    assert 0.5 < genre < 1
