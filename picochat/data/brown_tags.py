"""The tagged Brown corpus: part-of-speech tagging and genre classification data, with baselines.

``brown_tagged.jsonl.xz`` (built by scripts/build_brown_corpus.py, see BROWN_NOTICE.md) keeps the
original Brown tags: one line per corpus file, ``{"id", "genre", "sentences"}``, each sentence the
corpus line itself, ``"The/at Fulton/np-tl County/nn-tl ..."`` (the tag is after the LAST slash:
``1/2/cd``). ``load_tagged()`` maps the tags to the 12 universal tags of Petrov, Das & McDonald
(2012) unless asked for ``tagset="brown"``.

Held-out evaluation is by document (``split_documents``): passages of one article never sit on
both sides of a split, which would let a genre classifier recognise the article instead of the genre.
"""
from __future__ import annotations

import json
import lzma
import random
import re
import sys
from collections import Counter, defaultdict
from functools import lru_cache
from importlib import resources
from typing import Callable

from ..errors import PicochatError

TAGGED_RESOURCE = "brown_tagged.jsonl.xz"
UNIVERSAL_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X")

# en-brown.map of the universal-pos-tags project (github.com/slavpetrov/universal-pos-tags, after its
# commit fca8727 "Add NR-TL and NR-TL-HL", CC BY-SA 4.0), the file NLTK ships as
# taggers/universal_tagset/en-brown.map, regrouped by universal tag and lowercased as this corpus
# spells its tags. Every entry is kept, so the table lists exactly the 472 tags of the corpus.
# It is the reference, quirks included: noun or pronoun + verb contractions ("I'm" ppss+bem,
# "it's" pps+bez, "there's" ex+bez) are PRT, not their first part; "not"/"n't" (*) is ADV;
# interjections (uh) and existential "there" (ex) are PRT; possessive pronouns (pp$) are DET.
_REFERENCE_MAP = {
    "NOUN": """cd$ nn nn$ nn$-hl nn$-tl nn+in nn+nn-nc nn-hl nn-nc nn-tl nn-tl-hl nn-tl-nc nns nns$ nns$-hl
        nns$-nc nns$-tl nns$-tl-hl nns-hl nns-nc nns-tl nns-tl-hl nns-tl-nc np np$ np$-hl np$-tl
        np-hl np-nc np-tl np-tl-hl nps nps$ nps$-hl nps$-tl nps-hl nps-nc nps-tl nr nr$ nr$-tl nr-hl
        nr-tl nr-tl-hl nr-nc nrs nrs-tl pn pn$ pn-hl pn-nc pn-tl""",
    "VERB": """be be-hl be-tl bed bed* bed-nc bedz bedz* bedz-hl bedz-nc beg bem bem* bem-nc ben ben-tl ber
        ber* ber*-nc ber-hl ber-nc ber-tl bez bez* bez-hl bez-nc bez-tl do do* do*-hl do-hl do-nc
        do-tl dod dod* dod*-tl dod-nc doz doz* doz*-tl doz-hl doz-tl hv hv* hv+to hv-hl hv-nc hv-tl
        hvd hvd* hvd-hl hvg hvg-hl hvn hvz hvz* hvz-nc hvz-tl md md* md*-hl md+hv md+ppss md+to
        md-hl md-nc md-tl vb vb+at vb+in vb+jj-nc vb+ppo vb+rp vb+to vb+vb-nc vb-hl vb-nc vb-tl vbd
        vbd-hl vbd-nc vbd-tl vbg vbg+to vbg-hl vbg-nc vbg-tl vbn vbn+to vbn-hl vbn-nc vbn-tl
        vbn-tl-hl vbn-tl-nc vbz vbz-hl vbz-nc vbz-tl""",
    "ADJ": """ap ap+ap-nc ap-hl ap-nc ap-tl jj jj+jj-nc jj-hl jj-nc jj-tl jj-tl-hl jj-tl-nc jjr jjr+cs
        jjr-hl jjr-nc jjr-tl jjs jjs-hl jjs-tl jjt jjt-hl jjt-nc jjt-tl od od-hl od-nc od-tl""",
    "ADV": """* *-hl *-nc *-tl ql ql-hl ql-nc ql-tl qlp rb rb+cs rb-hl rb-nc rb-tl rbr rbr+cs rbr-nc rbt
        rn wql wql-tl wrb wrb-hl wrb-nc wrb-tl""",
    "PRON": """pp$$ ppl ppl-hl ppl-nc ppl-tl ppls ppo ppo-hl ppo-nc ppo-tl pps pps-hl pps-nc pps-tl ppss
        ppss-hl ppss-nc ppss-tl wpo wpo-nc wpo-tl wps wps-hl wps-nc wps-tl""",
    "DET": """abx at at-hl at-nc at-tl at-tl-hl dt dt$ dt-hl dt-nc dt-tl dti dti-hl dti-tl dts dts-hl dtx
        pp$ pp$-hl pp$-nc pp$-tl wdt wdt-hl wdt-nc wp$""",
    "ADP": """cs cs-hl cs-nc cs-tl in in+in in+ppo in-hl in-nc in-tl in-tl-hl""",
    "NUM": """cd cd-hl cd-nc cd-tl cd-tl-hl""",
    "CONJ": """cc cc-hl cc-nc cc-tl cc-tl-hl""",
    "PRT": """abl abn abn-hl abn-nc abn-tl ap$ dt+bez dt+bez-nc dt+md dts+bez ex ex+bez ex+hvd ex+hvz
        ex+md ex-hl ex-nc jj$-tl nn+bez nn+bez-tl nn+hvd-tl nn+hvz nn+hvz-tl nn+md nns+md np+bez
        np+bez-nc np+hvz np+hvz-nc np+md nr+md pn+bez pn+hvd pn+hvz pn+md pps+bez pps+bez-hl
        pps+bez-nc pps+hvd pps+hvz pps+md ppss+bem ppss+ber ppss+ber-n ppss+ber-nc ppss+ber-tl
        ppss+bez ppss+bez* ppss+hv ppss+hv-tl ppss+hvd ppss+md ppss+md-nc ppss+vb rb$ rb+bez
        rb+bez-hl rb+bez-nc rp rp+in rp-hl rp-nc rp-tl to to+vb to-hl to-nc to-tl uh uh-hl uh-nc
        uh-tl wdt+ber wdt+bez wdt+bez-hl wdt+bez-nc wdt+bez-tl wdt+dod wdt+hvz wps+bez wps+bez-nc
        wps+bez-tl wps+hvd wps+hvz wps+md wrb+ber wrb+bez wrb+bez-tl wrb+do wrb+dod wrb+dod* wrb+doz
        wrb+in wrb+md""",
    ".": """' '' ( (-hl ) )-hl , ,-hl ,-nc ,-tl -- ---hl . .-hl .-nc .-tl : :-hl :-tl ``""",
    "X": """do+ppss fw-* fw-*-tl fw-at fw-at+nn-tl fw-at+np-tl fw-at-hl fw-at-tl fw-be fw-ber fw-bez
        fw-cc fw-cc-tl fw-cd fw-cd-tl fw-cs fw-dt fw-dt+bez fw-dts fw-hv fw-in fw-in+at fw-in+at-t
        fw-in+at-tl fw-in+nn fw-in+nn-tl fw-in+np-tl fw-in-tl fw-jj fw-jj-nc fw-jj-tl fw-jjr fw-jjt
        fw-nn fw-nn$ fw-nn$-tl fw-nn-nc fw-nn-tl fw-nn-tl-nc fw-nns fw-nns-nc fw-nns-tl fw-np
        fw-np-tl fw-nps fw-nps-tl fw-nr fw-nr-tl fw-od-nc fw-od-tl fw-pn fw-pp$ fw-pp$-nc fw-pp$-tl
        fw-ppl fw-ppl+vbz fw-ppo fw-ppo+in fw-pps fw-ppss fw-ppss+hv fw-ql fw-rb fw-rb+cc fw-rb-tl
        fw-to+vb fw-uh fw-uh-nc fw-uh-tl fw-vb fw-vb-nc fw-vb-tl fw-vbd fw-vbd-tl fw-vbg fw-vbg-tl
        fw-vbn fw-vbz fw-wdt fw-wpo fw-wps nil wdt+ber+pp wdt+do+pps""",
}
BROWN_TO_UNIVERSAL: dict[str, str] = {t: u for u, tags in _REFERENCE_MAP.items() for t in tags.split()}
_MARKERS = re.compile(r"(?:-(?:tl|hl|nc))+$")  # title, headline, cited-word markers after a tag


def universal(brown_tag: str) -> str:
    """The universal tag of a Brown tag: 'at' -> 'DET', 'nn-tl' -> 'NOUN', 'fw-nn' -> 'X'.

    NLTK looks the upper-cased tag up in the same table and calls anything missing X. Here a tag
    missing from the table (Brown-tagged text other than this corpus) falls back to its tag without
    -tl/-hl/-nc markers, which is what the table does for every marked tag it lists, and fw-* to X;
    anything else raises ValueError rather than quietly becoming X.
    """
    tag = brown_tag.lower()
    if tag in BROWN_TO_UNIVERSAL:
        return BROWN_TO_UNIVERSAL[tag]
    base = _MARKERS.sub("", tag)
    if base in BROWN_TO_UNIVERSAL:
        return BROWN_TO_UNIVERSAL[base]
    if tag.startswith("fw-"):
        return "X"
    raise ValueError(f"Brown tag {brown_tag!r} is not in the universal map (en-brown.map)")


# The corpus README's 15 categories A-R, by cats.txt name. The Brown manual (bcm.html, which the README
# names) splits them into informative prose (A-J) and imaginative prose (K-R), and titles A-C "Press"
# and K-P "Fiction"; informative prose is cut once more into general prose (D-G) and learned and
# government writing (H, J).
GENRE_GROUPS = {
    "news": "press", "editorial": "press", "reviews": "press",                                    # A-C
    "religion": "general", "hobbies": "general", "lore": "general", "belles_lettres": "general",  # D-G
    "government": "learned", "learned": "learned",                                                # H, J
    "fiction": "fiction", "mystery": "fiction", "science_fiction": "fiction",                     # K-M
    "adventure": "fiction", "romance": "fiction", "humor": "fiction",                             # N, P, R
}


def split_token(token: str) -> tuple[str, str]:
    """'don't/do*' -> ("don't", "do*"); '1/2/cd' -> ("1/2", "cd")."""
    word, _, tag = token.rpartition("/")
    return word, tag


NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", "'", ")", "]", "''"}
NO_SPACE_AFTER = {"(", "[", "``"}


def detokenize(tokens: list[tuple[str, str]]) -> str:
    """Join (word, tag) pairs the way a typesetter would: 'said , ``hi\'\' .' -> 'said, "hi".'

    The same function prints brown.jsonl.xz, so passages read like the pretraining text.
    """
    out: list[str] = []
    glue = True  # no space before the next word (start of paragraph, or after an opening bracket)
    prev = ""
    for w, tag in tokens:
        # the corpus repeats sentence-final ';', '?', '!' ("?/. ?/."), ends "Jr./np ./." with a
        # second period, and follows an inch mark ("10''/nn") with a stray quote; print each once
        if (w == prev and w in ";?!:") or (w == "''" and len(prev) > 2 and prev.endswith("''")) or (
                tag == "." and w == "." and prev.endswith(".") and re.search(r"[A-Za-z]", prev)):
            continue
        attach = glue or w in NO_SPACE_BEFORE or w.lower() == "n't"
        text = '"' if w in ("``", "''") else re.sub(r"''$", '"', w)
        out.append(text if attach else " " + text)
        glue = w in NO_SPACE_AFTER
        prev = w
    return "".join(out)


@lru_cache(maxsize=1)
def _tagged_lines() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    raw = resources.files(__package__).joinpath(TAGGED_RESOURCE).read_bytes()
    docs = (json.loads(line) for line in lzma.decompress(raw).decode("utf-8").splitlines())
    return tuple((d["id"], d["genre"], tuple(d["sentences"])) for d in docs)


def load_tagged(tagset: str = "universal") -> list[dict]:
    """The 500 tagged documents: {"id", "genre", "sentences": [[(word, tag), ...], ...]}.

    ``tagset="universal"`` maps every tag with ``universal``; ``"brown"`` keeps the corpus's own.
    """
    if tagset not in ("universal", "brown"):
        raise PicochatError(f"unknown tagset {tagset!r}; use 'universal' or 'brown'")
    convert = universal if tagset == "universal" else str
    tag_of = {t: sys.intern(convert(t)) for t in BROWN_TO_UNIVERSAL}
    docs = []
    for doc_id, genre, lines in _tagged_lines():
        sentences = []
        for line in lines:
            pairs = [split_token(t) for t in line.split()]
            # one string per spelling: a million tokens share ~56k words
            sentences.append([(sys.intern(w), tag_of[t] if t in tag_of else convert(t)) for w, t in pairs])
        docs.append({"id": doc_id, "genre": genre, "sentences": sentences})
    return docs


def split_documents(docs: list[dict], test_fraction: float = 0.2, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) by whole document, the same for the same seed, stratified by genre group.

    Each group gives round(n * fraction) documents, at least one, to test and to val, so every group
    is in every split; documents keep their corpus order inside a split.
    """
    if not (0 < test_fraction and 0 <= val_fraction and test_fraction + val_fraction < 1):
        raise PicochatError(f"fractions must be test > 0, val >= 0, test + val < 1 "
                            f"(got test={test_fraction}, val={val_fraction})")
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(docs):
        by_group[GENRE_GROUPS[d["genre"]]].append(i)
    rng = random.Random(seed)
    where: dict[int, str] = {}
    for group in sorted(by_group):
        members = sorted(by_group[group], key=lambda i: docs[i]["id"])  # input order must not matter
        rng.shuffle(members)
        n_test = max(1, round(len(members) * test_fraction))
        n_val = max(1, round(len(members) * val_fraction)) if val_fraction > 0 else 0
        if n_test + n_val >= len(members):
            raise PicochatError(f"genre group {group!r} has {len(members)} documents, too few to give "
                                f"{n_test} to test, {n_val} to val and keep some for training")
        where.update({i: "test" for i in members[:n_test]})
        where.update({i: "val" for i in members[n_test:n_test + n_val]})
    split = {"train": [], "val": [], "test": []}
    for i, d in enumerate(docs):
        split[where.get(i, "train")].append(d)
    return split["train"], split["val"], split["test"]


def _is_word(token: str) -> bool:
    return any(c.isalnum() for c in token)


def passages(doc: dict, words: int = 200, min_words: int | None = None) -> list[str]:
    """Cut a document into passages of at most ``words`` words, on sentence boundaries.

    Words are tokens with a letter or digit (punctuation is free). A passage closes when the next
    sentence would not fit, so it can fall short of the budget; a sentence longer than the budget is
    a passage of its own; a last passage shorter than ``min_words`` (default words // 2) is dropped
    rather than left as a stub. Text is printed by ``detokenize``, with no paragraph breaks: the
    tagged file keeps sentences, not paragraphs.
    """
    min_words = words // 2 if min_words is None else min_words
    out: list[str] = []
    current: list[tuple[str, str]] = []
    count = 0
    for sentence in doc["sentences"]:
        n = sum(_is_word(w) for w, _ in sentence)
        if current and count + n > words:
            out.append(detokenize(current))
            current, count = [], 0
        current.extend(sentence)
        count += n
    if current and count >= min_words:
        out.append(detokenize(current))
    return out


def labelled_passages(docs: list[dict], words: int = 200, by: str = "group") -> list[tuple[str, str]]:
    """(passage, label) for every passage of every document; label is the genre group or the genre."""
    label = (lambda g: GENRE_GROUPS[g]) if by == "group" else (lambda g: g)
    return [(p, label(d["genre"])) for d in docs for p in passages(d, words)]


def most_frequent_tagger(train_docs: list[dict]) -> Callable[[str], str]:
    """A tagger that gives each word its most frequent training tag.

    A word never seen as spelled tries its lowercase form (sentence-initial capitals). A word never
    seen at all gets the most frequent tag of training words seen once with the same shape (any digit,
    else the last three letters lowercased), since rare words are what unknown words resemble;
    NOUN when the shape is new too.
    """
    exact: dict[str, Counter] = defaultdict(Counter)
    lower: dict[str, Counter] = defaultdict(Counter)
    for d in train_docs:
        for sentence in d["sentences"]:
            for w, t in sentence:
                exact[w][t] += 1
                lower[w.lower()][t] += 1

    def shape(w: str) -> str:
        return "#" if any(c.isdigit() for c in w) else w[-3:].lower()

    rare: dict[str, Counter] = defaultdict(Counter)
    for w, tags in exact.items():
        if sum(tags.values()) == 1:
            rare[shape(w)].update(tags)
    best = {w: tags.most_common(1)[0][0] for w, tags in exact.items()}
    best_lower = {w: tags.most_common(1)[0][0] for w, tags in lower.items()}
    best_shape = {s: tags.most_common(1)[0][0] for s, tags in rare.items()}

    def tag(word: str) -> str:
        if word in best:
            return best[word]
        if word.lower() in best_lower:
            return best_lower[word.lower()]
        return best_shape.get(shape(word), "NOUN")
    return tag


def most_frequent_tag_baseline(train_docs: list[dict], test_docs: list[dict]) -> float:
    """Token accuracy of ``most_frequent_tagger(train_docs)`` on every token of ``test_docs``."""
    tag = most_frequent_tagger(train_docs)
    pairs = [(w, t) for d in test_docs for sentence in d["sentences"] for w, t in sentence]
    if not pairs:
        raise PicochatError("no test tokens to measure the baseline on")
    return sum(tag(w) == t for w, t in pairs) / len(pairs)


def tfidf_genre_baseline(train_passages: list[tuple[str, str]], test_passages: list[tuple[str, str]],
                         seed: int = 0) -> float:
    """Accuracy on ``test_passages`` of TF-IDF words + logistic regression trained on ``train_passages``.

    Both are (text, label) pairs, e.g. from ``labelled_passages``. scikit-learn's defaults apart from
    sublinear term frequency (a word said ten times is not ten times the evidence) and enough
    iterations to converge: a baseline, not a tuned model.
    """
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise PicochatError("the TF-IDF baseline needs scikit-learn: pip install 'picochat[test]'") from None
    if not train_passages or not test_passages:
        raise PicochatError("the TF-IDF baseline needs both training and test passages")
    model = make_pipeline(TfidfVectorizer(sublinear_tf=True),
                          LogisticRegression(max_iter=2000, random_state=seed))
    texts, labels = zip(*train_passages)
    test_texts, test_labels = zip(*test_passages)
    # the matrices are small: BLAS threads only fight each other (lbfgs ran 7x slower on 2 cores)
    with threadpool_limits(limits=1):
        model.fit(list(texts), list(labels))
        predicted = model.predict(list(test_texts))
    return sum(p == t for p, t in zip(predicted, test_labels)) / len(test_labels)
