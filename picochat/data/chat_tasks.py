"""Generated conversations with a checkable answer, each task with a fixed held-out split.

A task draws questions from a finite universe of *keys*: the tuple that defines a question, e.g.
``("add", 23, 45)``. Whether a key is held out is decided by a stable hash of the key alone
(blake2b, about 15% of keys go to "test"), never by n or the seed, so train and test are disjoint
however many conversations anyone asks for. Commutative questions share one key (23 + 45 and 45 + 23
are both ``("add", 23, 45)``), and the word problems use the arithmetic keys, so no phrasing of a
held-out sum ever reaches training through another task. A few plain forms of the greeting and
identity questions ("Hello", "Who are you?") are pinned to train: those are what people type.

``Task.generate(split, n, seed)`` is deterministic for (split, n, seed). It returns n conversations
with distinct keys, or every key of the split (each once, shuffled) when n is at least the split's
size; phrasing templates are drawn per question, so one key always reads one way for a given seed.

The answer rule (``Task.check(reply, answer)``), one strict rule per answer kind:

- number (addition, subtraction, multiplication, compare, count_letter, units, word_problems):
  the reply's answer is its LAST number: the last match of ``-?\\d+(,\\d{3})*(\\.\\d+)?``, where the
  minus counts only when no letter or digit is glued before it (``10-5`` reads as 5, ``= -5`` as -5,
  ``1,000`` as 1000, a sentence's final period is not a decimal point). It must equal the answer
  as a number (``68.0`` is 68; ``68.5`` is not).
- word (weekday): the reply's LAST word (``[a-z]+`` after lowercasing) equals the answer, lowercased.
- spelling (spell): the reply's LAST hyphen-joined letter sequence (``c-a-t``, any case) equals the
  answer (the word's letters joined by ``-``, lowercase).

Every generated assistant answer ends with its answer ("23 + 45 = 68.", "It is Tuesday.",
"cat is spelled c-a-t."), so a model trained on these satisfies the rule. Greetings and identity have
no exact answer: checkable=False, answer None, and check() refuses them.
"""
from __future__ import annotations

import hashlib
import random
import re
from decimal import Decimal
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Optional

from ..errors import PicochatError

TEST_PERCENT = 15  # share of each task's keys held out for evaluation (by hash)
SPLITS = ("train", "test")


def is_test_key(key: tuple) -> bool:
    """The held-out rule: a stable hash of the key's repr (same on every machine and Python run)."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % 100 < TEST_PERCENT


# ---------------------------------------------------------------- the answer rule
_NUMBER = re.compile(r"(?:(?<!\w)-)?\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")
_SPELLING = re.compile(r"(?<![A-Za-z-])[A-Za-z](?:-[A-Za-z])+(?![A-Za-z-])")


def extract_answer(reply: str, kind: str) -> Optional[str]:
    """The reply's answer under the rule of ``kind`` (number, word, spelling), or None if it has none."""
    if kind == "number":
        found = _NUMBER.findall(reply)
        if not found:
            return None
        x = Decimal(found[-1].replace(",", ""))
        return str(int(x)) if x == int(x) else str(x)
    if kind == "word":
        found = _WORD.findall(reply.lower())
        return found[-1] if found else None
    if kind == "spelling":
        found = _SPELLING.findall(reply)
        return found[-1].lower() if found else None
    raise PicochatError(f"unknown answer kind {kind!r}; use number, word or spelling")


# ---------------------------------------------------------------- the task type
@dataclass(frozen=True)
class Task:
    name: str
    description: str
    checkable: bool
    kind: Optional[str]                                   # number | word | spelling | None
    keys: Callable[[], Iterable[tuple]] = field(repr=False)             # the whole universe, in order
    sample: Callable[[random.Random], tuple] = field(repr=False)        # one key, as training wants them
    render: Callable[[tuple, random.Random], tuple] = field(repr=False)  # key -> (question, reply, answer)
    universe: int = 0      # len(list(keys())) when known without enumerating; <= 0: enumerate to count
    split_key: Callable[[tuple], tuple] = field(default=lambda k: k, repr=False)  # what the hash sees
    pinned_train: frozenset = frozenset()                # keys always in train (the plainest phrasings)

    def in_split(self, key: tuple, split: str) -> bool:
        test = key not in self.pinned_train and is_test_key(self.split_key(key))
        return test if split == "test" else not test

    def split_keys(self, split: str) -> list[tuple]:
        """Every key of a split, in the universe's order."""
        _check_split(split)
        return _split_keys(self, split)

    def size(self, split: str = "train") -> int:
        return len(self.split_keys(split))

    def generate(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n conversations {"messages": [user, assistant], "answer": str or None} from one split,
        with distinct keys; all of the split (shuffled) when n >= its size. Deterministic."""
        _check_split(split)
        if n < 0:
            raise PicochatError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        # universe <= 0: small or data-dependent (word lists); count it by enumerating (cached)
        expected = (self.universe * (TEST_PERCENT if split == "test" else 100 - TEST_PERCENT) / 100
                    if self.universe > 0 else self.size(split))
        if n >= expected / 4:
            # many of the split: enumerate it (rejection sampling would crawl near the end)
            keys = self.split_keys(split)
            keys = rng.sample(keys, min(n, len(keys)))
        else:
            keys, seen = [], set()
            while len(keys) < n:
                k = self.sample(rng)
                if k not in seen and self.in_split(k, split):
                    seen.add(k)
                    keys.append(k)
        out = []
        for k in keys:
            q, a, answer = self.render(k, rng)
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                        "answer": answer})
        return out

    def check(self, reply: str, answer: str) -> bool:
        """Whether ``reply`` carries ``answer`` under this task's rule (see the module docstring)."""
        if not self.checkable:
            raise PicochatError(f"task {self.name} has no exact answer to check; "
                                f"checkable tasks: {', '.join(n for n, t in TASKS.items() if t.checkable)}")
        got = extract_answer(reply, self.kind)
        if got is None:
            return False
        if self.kind == "number":
            return Decimal(got) == Decimal(answer)
        return got == answer.lower()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise PicochatError(f"unknown split {split!r}; use train or test")


@lru_cache(maxsize=None)
def _both_splits(task: Task) -> dict[str, list[tuple]]:
    # one pass for both splits: the big arithmetic universes (500k keys) take about a second
    out: dict[str, list[tuple]] = {"train": [], "test": []}
    for k in task.keys():
        out["test" if task.in_split(k, "test") else "train"].append(k)
    return out


def _split_keys(task: Task, split: str) -> list[tuple]:
    return _both_splits(task)[split]


# ---------------------------------------------------------------- arithmetic
def _digits_number(rng: random.Random, digits: tuple[int, ...]) -> int:
    """A number with a uniformly chosen count of digits, so 1-digit numbers are not drowned out."""
    d = rng.choice(digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _pair_keys(op: str, lo: int, hi: int) -> Callable[[], Iterable[tuple]]:
    """Every pair once: (op, a, b) with a <= b for + and * (commutative), a >= b for - (never negative)."""
    def keys():
        for a in range(lo, hi + 1):
            for b in (range(lo, a + 1) if op == "sub" else range(a, hi + 1)):
                yield (op, a, b)
    return keys


ADD_Q = ["What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?",
         "Add {a} and {b}.", "What do you get when you add {a} and {b}?", "How much is {a} plus {b}?",
         "Compute {a}+{b}.", "What's the sum of {a} and {b}?", "{a}+{b}"]
SUB_Q = ["What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?",
         "Subtract {b} from {a}.", "What do you get when you take {b} away from {a}?",
         "How much is {a} minus {b}?", "Compute {a}-{b}.", "What's the difference between {a} and {b}?",
         "{a}-{b}"]
MUL_Q = ["What is {a} * {b}?", "What is {a} times {b}?", "Calculate {a} x {b}.", "{a} * {b} = ?",
         "Multiply {a} by {b}.", "What do you get when you multiply {a} and {b}?",
         "How much is {a} times {b}?", "Compute {a}*{b}.", "What's the product of {a} and {b}?", "{a}*{b}"]
ARITH = {"add": (ADD_Q, "+", lambda a, b: a + b), "sub": (SUB_Q, "-", lambda a, b: a - b),
         "mul": (MUL_Q, "*", lambda a, b: a * b)}


def _arith_render(key: tuple, rng: random.Random) -> tuple:
    op, a, b = key
    templates, sym, f = ARITH[op]
    if op != "sub" and rng.random() < 0.5:  # the key is the unordered pair: show either order
        a, b = b, a
    c = f(a, b)
    reply = rng.choice([f"{a} {sym} {b} = {c}.", f"{a} {sym} {b} = {c}.", f"The answer is {c}."])
    return rng.choice(templates).format(a=a, b=b), reply, str(c)


def _arith_task(name: str, op: str, digits: tuple[int, ...], description: str) -> Task:
    lo, hi = (0 if min(digits) == 1 else 10 ** (min(digits) - 1)), 10 ** max(digits) - 1
    n = hi - lo + 1

    def sample(rng):
        a, b = _digits_number(rng, digits), _digits_number(rng, digits)
        return (op, max(a, b), min(a, b)) if op == "sub" else (op, min(a, b), max(a, b))
    universe = n * (n + 1) // 2
    return Task(name, description, True, "number", _pair_keys(op, lo, hi), sample,
                _arith_render, universe)


# ---------------------------------------------------------------- compare
COMPARE_Q = ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
             "What is the larger of {a} and {b}?", "Which is greater, {a} or {b}?",
             "Is {a} or {b} the bigger number?", "Pick the larger number: {a}, {b}."]


def _compare_keys():
    for a in range(1000):
        for b in range(a + 1, 1000):
            yield ("cmp", a, b)


def _compare_sample(rng):
    while True:
        a, b = _digits_number(rng, (1, 2, 3)), _digits_number(rng, (1, 2, 3))
        if a != b:
            return ("cmp", min(a, b), max(a, b))


def _compare_render(key, rng):
    _, small, big = key
    a, b = (small, big) if rng.random() < 0.5 else (big, small)
    reply = rng.choice([f"{big} is larger than {small}, so the answer is {big}.", f"The larger number is {big}.",
                        f"{big} > {small}. The answer is {big}."])
    return rng.choice(COMPARE_Q).format(a=a, b=b), reply, str(big)


# ---------------------------------------------------------------- words: count_letter and spell
@lru_cache(maxsize=None)
def words() -> tuple[str, ...]:
    """Common lowercase English words (3-10 letters, at least 20 uses) of the embedded Brown corpus."""
    from collections import Counter

    from .corpus import brown_documents
    counts = Counter(w for d in brown_documents() for w in re.findall(r"\b[a-z]+\b", d["text"]))
    return tuple(sorted(w for w, c in counts.items() if c >= 20 and 3 <= len(w) <= 10))


LETTERS = "abcdefghijklmnopqrstuvwxyz"
COUNT_Q = ['How many times does the letter "{c}" appear in "{w}"?', 'How many {c}\'s are in the word "{w}"?',
           'Count the letter {c} in "{w}".', 'How many times does "{c}" occur in the word {w}?',
           'In the word "{w}", how many times do you see the letter {c}?']


def _count_keys():
    for w in words():
        for c in LETTERS:
            yield ("count", w, c)


def _count_sample(rng):
    w = rng.choice(words())
    # mostly letters of the word (the interesting case), sometimes one it lacks (answer 0)
    c = rng.choice(w) if rng.random() < 0.75 else rng.choice(LETTERS)
    return ("count", w, c)


def _count_render(key, rng):
    _, w, c = key
    k = w.count(c)
    times = "time" if k == 1 else "times"
    reply = rng.choice([f'The letter "{c}" appears in "{w}" {k} {times}. The answer is {k}.',
                        f'"{w}" has {k} {c}\'s. The answer is {k}.', f"The answer is {k}."])
    return rng.choice(COUNT_Q).format(c=c, w=w), reply, str(k)


SPELL_Q = ['Spell the word "{w}".', "How do you spell {w}?", 'Spell "{w}" letter by letter.',
           "Can you spell {w} for me?", 'What are the letters of "{w}"?']


def _spell_render(key, rng):
    w = key[1]
    spelled = "-".join(w)
    reply = rng.choice([f'"{w}" is spelled {spelled}.', f"{w} is spelled {spelled}.", f"It is spelled {spelled}."])
    return rng.choice(SPELL_Q).format(w=w), reply, spelled


# ---------------------------------------------------------------- weekday
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MAX_DAYS = 365
WEEKDAY_Q = ["What day of the week is it {n} days after {d}?", "If today is {d}, what day will it be in {n} days?",
             "Today is {d}. What day is it {n} days from now?", "What day comes {n} days after {d}?",
             "{n} days after {d} is which day of the week?"]


def _weekday_render(key, rng):
    _, d, n = key
    answer = DAYS[(d + n) % 7]
    reply = rng.choice([f"{n} days after {DAYS[d]} it is {answer}.", f"It is {answer}.", f"The answer is {answer}."])
    q = rng.choice(WEEKDAY_Q).format(d=DAYS[d], n=n)
    if n == 1:
        q, reply = (s.replace("in 1 days", "tomorrow").replace("1 days", "1 day") for s in (q, reply))
    return q, reply, answer


# ---------------------------------------------------------------- units
# (big unit, small unit, how many small in one big): conversions both ways stay exact integers
UNITS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
         ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("years", "months", 12),
         ("dollars", "cents", 100), ("feet", "inches", 12))
SINGULAR = {"feet": "foot", "inches": "inch", "centuries": "century"}
MAX_UNITS = 100
UNITS_Q = ["How many {to} are in {x}?", "Convert {x} to {to}.", "{x} is how many {to}?",
           "What is {x} in {to}?", "How many {to} make {x}?"]


def _qty(v: int, unit: str) -> str:
    return f"{v} {SINGULAR.get(unit, unit[:-1]) if v == 1 else unit}"


def _units_keys():
    for i in range(len(UNITS)):
        for v in range(1, MAX_UNITS + 1):
            for down in (True, False):
                yield ("units", i, v, down)


def _units_render(key, rng):
    _, i, v, down = key
    big, small, f = UNITS[i]
    # down: v big -> v*f small; up: v*f small -> v big (the key's v is always the big-unit count)
    frm, to, x, y = (big, small, v, v * f) if down else (small, big, v * f, v)
    q = rng.choice(UNITS_Q).format(x=_qty(x, frm), to=to)
    reply = rng.choice([f"{_qty(x, frm)} is {_qty(y, to)}. The answer is {y}.",
                        f"{_qty(x, frm)} = {_qty(y, to)}, so the answer is {y}.", f"The answer is {y}."])
    return q, reply, str(y)


# ---------------------------------------------------------------- word problems
NAMES = ("Tom", "Anna", "Sam", "Mia", "Leo", "Emma", "Ben", "Lucy", "Max", "Sara", "Omar", "Nina")
THINGS = ("apples", "books", "marbles", "pencils", "cookies", "stickers", "coins", "cards", "flowers", "eggs")
WP_ADD = ["{n} has {a} {t} and buys {b} more. How many {t} does {n} have now?",
          "{n} had {a} {t}. A friend gave {n} {b} more. How many {t} does {n} have?",
          "There are {a} {t} in a basket and {n} puts in {b} more. How many {t} are in the basket?"]
WP_SUB = ["{n} has {a} {t} and gives away {b}. How many {t} are left?",
          "{n} had {a} {t} and lost {b} of them. How many {t} does {n} have now?",
          "There are {a} {t} on the table. {n} takes {b}. How many {t} are still on the table?"]
WP_MUL = ["{n} has {a} boxes with {b} {t} in each. How many {t} are there in total?",
          "{n} buys {a} bags of {t}, each with {b} {t}. How many {t} does {n} buy?"]
WP_MAX = 99  # add/sub numbers 1..99, multiplication factors 1..12
WP_MUL_MAX = 12


def _wp_keys():
    yield from _pair_keys("add", 1, WP_MAX)()
    yield from _pair_keys("sub", 1, WP_MAX)()
    yield from _pair_keys("mul", 1, WP_MUL_MAX)()


def _wp_sample(rng):
    op = rng.choice(("add", "sub", "mul"))
    hi = WP_MUL_MAX if op == "mul" else WP_MAX
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    return (op, max(a, b), min(a, b)) if op == "sub" else (op, min(a, b), max(a, b))


def _wp_render(key, rng):
    op, a, b = key
    if op != "sub" and rng.random() < 0.5:
        a, b = b, a
    templates, sym, f = {"add": (WP_ADD, "+", ARITH["add"][2]), "sub": (WP_SUB, "-", ARITH["sub"][2]),
                         "mul": (WP_MUL, "*", ARITH["mul"][2])}[op]
    c = f(a, b)
    q = rng.choice(templates).format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    reply = rng.choice([f"{a} {sym} {b} = {c}. The answer is {c}.", f"{a} {sym} {b} = {c}."])
    return q, reply, str(c)


# ---------------------------------------------------------------- greetings and small talk
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi there! What can I do for you?",
                    "Hello! What would you like to talk about?", "Hi! How can I help?"]
SMALL_TALK = {  # user lines -> replies in kind
    ("Hi", "Hello", "Hey", "Hi there", "Hello there", "Hey there", "Greetings", "Howdy", "Good morning",
     "Good afternoon", "Good evening", "Hiya", "Hey picochat", "Hello picochat", "Hi picochat"): GREETING_REPLIES,
    ("How are you?", "How are you doing?", "How's it going?", "How are you today?", "How do you do?",
     "Are you doing well?", "How have you been?"):
        ["I'm doing well, thank you! How can I help you today?", "I'm fine, thanks for asking! How are you?",
         "Very well, thank you! What can I do for you?"],
    ("What's up?", "Whats up", "Sup?", "What are you up to?"):
        ["Not much, just here to help. What's on your mind?", "Just waiting for your questions! What's up with you?"],
    ("Nice to meet you", "Pleased to meet you", "Glad to meet you"):
        ["Nice to meet you too! How can I help?", "Likewise! What can I do for you today?"],
    ("Thank you", "Thanks", "Thanks a lot", "Thank you very much", "Thanks for your help", "Much appreciated"):
        ["You're welcome!", "You're welcome! Happy to help.", "Glad I could help!"],
    ("Bye", "Goodbye", "See you later", "See you", "Good night", "Bye bye", "Talk to you later", "Have a nice day"):
        ["Goodbye! Have a nice day.", "Bye! Talk to you soon.", "See you later! Take care."],
}
_SMALL_TALK_REPLIES = {line: replies for lines, replies in SMALL_TALK.items() for line in lines}
GREETING_PINNED = ("Hi", "Hello", "Hey", "Hi!", "Hello!", "How are you?", "Thank you", "Thanks", "Bye", "Goodbye")


def _greet_variants(line: str) -> list[str]:
    # how people type it: with or without punctuation, a smiley, all lowercase
    forms = [line, line.rstrip("?"), line + " :)"] if line.endswith("?") else [line, line + "!", line + ".", line + " :)"]
    return forms + [f.lower() for f in forms]


@lru_cache(maxsize=None)
def _greet_universe() -> tuple:
    """Keys ("greet", text the user types, the plain line it varies); each text once."""
    out = {}
    for line in _SMALL_TALK_REPLIES:
        for text in _greet_variants(line):
            out.setdefault(text, ("greet", text, line))
    return tuple(out.values())


def _greet_render(key, rng):
    return key[1], rng.choice(_SMALL_TALK_REPLIES[key[2]]), None


# ---------------------------------------------------------------- identity
ME = "picochat, a small ChatGPT made with picochat, an open-source project"
IDENTITY = {
    ("Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.", "What is your name?",
     "What's your name?", "What should I call you?", "Do you have a name?", "Which model are you?",
     "Which AI are you?", "What kind of assistant are you?", "Are you ChatGPT?", "Are you SmolLM?",
     "Are you a human?", "Are you a person?", "What is picochat?"):
        [f"I am {ME}.", f"I'm {ME}. How can I help you?", "My name is picochat. I am a small ChatGPT made with "
         "picochat, an open-source project.", "I'm picochat, a small AI assistant made with picochat, "
         "an open-source project."],
    ("Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Who developed you?",
     "Where do you come from?", "How were you made?", "Who is your creator?"):
        ["I was made with picochat, an open-source project that builds a small ChatGPT from first principles.",
         f"I'm {ME}: I was trained with picochat's open-source code.",
         "picochat made me: an open-source project for building a small ChatGPT from scratch."],
}
_IDENTITY_REPLIES = {q: r for qs, r in IDENTITY.items() for q in qs}
ID_PREFIX = ["", "Hi! ", "Hello, ", "Hey, ", "Quick question: ", "Excuse me, "]
_ID_PINNED = ("Who are you?", "What is your name?", "Who made you?", "What are you?", "Who created you?")


def _id_text(q: str, prefix: str, lower: bool) -> str:
    s = prefix + (q[0].lower() + q[1:] if prefix and not q.startswith("I") else q)
    return s.lower() if lower else s


@lru_cache(maxsize=None)
def _id_universe() -> tuple:
    return tuple(dict.fromkeys(("id", _id_text(q, p, low), q) for q in _IDENTITY_REPLIES
                               for p in ID_PREFIX for low in (False, True)))


def _id_render(key, rng):
    return key[1], rng.choice(_IDENTITY_REPLIES[key[2]]), None


# ---------------------------------------------------------------- the registry
def _arith_tasks() -> list[Task]:
    return [
        _arith_task("addition", "add", (1, 2, 3), "addition of 1-3 digit numbers"),
        _arith_task("addition2", "add", (2,), "addition of two 2-digit numbers (the headline eval)"),
        _arith_task("subtraction", "sub", (1, 2, 3), "subtraction of 1-3 digit numbers (never negative)"),
        _arith_task("multiplication", "mul", (1, 2), "multiplication of 1-2 digit numbers"),
    ]


def _word_key_sample(rng):
    return ("spell", rng.choice(words()))


def _all_tasks() -> list[Task]:
    tasks = _arith_tasks()
    tasks += [
        Task("compare", "which of two numbers (0-999) is larger; the answer is the larger number", True,
             "number", _compare_keys, _compare_sample, _compare_render, 1000 * 999 // 2),
        Task("count_letter", "how many times a letter occurs in a word", True, "number", _count_keys,
             _count_sample, _count_render, universe=-1),
        Task("spell", "spell a word letter by letter (c-a-t)", True, "spelling",
             lambda: (("spell", w) for w in words()), _word_key_sample, _spell_render, universe=-1),
        Task("weekday", f"the day of the week 1-{MAX_DAYS} days after a given day", True, "word",
             lambda: (("day", d, n) for d in range(7) for n in range(1, MAX_DAYS + 1)),
             lambda rng: ("day", rng.randrange(7), rng.randint(1, MAX_DAYS)), _weekday_render, 7 * MAX_DAYS),
        Task("units", "unit conversions with exact integer answers (km/m, kg/g, hours/minutes, ...)", True,
             "number", _units_keys,
             lambda rng: ("units", rng.randrange(len(UNITS)), rng.randint(1, MAX_UNITS), rng.random() < 0.5),
             _units_render, len(UNITS) * MAX_UNITS * 2),
        # word problems hash the arithmetic key, so a held-out sum stays held out in every phrasing
        Task("word_problems", "short word problems built from addition, subtraction and multiplication", True,
             "number", _wp_keys, _wp_sample, _wp_render,
             WP_MAX * (WP_MAX + 1) // 2 * 2 + WP_MUL_MAX * (WP_MUL_MAX + 1) // 2),
        Task("greetings", "greetings and small talk, answered in kind", False, None, _greet_universe,
             lambda rng: rng.choice(_greet_universe()), _greet_render, universe=-1,
             split_key=lambda k: k[:2], pinned_train=frozenset(k for k in _greet_universe()
                                                               if k[1] in GREETING_PINNED)),
        Task("identity", "the assistant says it is picochat, made with picochat (an open-source project)",
             False, None, _id_universe, lambda rng: rng.choice(_id_universe()), _id_render, universe=-1,
             split_key=lambda k: k[:2],
             pinned_train=frozenset(("id", q, q) for q in _ID_PINNED)),
    ]
    return tasks


# name -> Task. The word tasks read the Brown corpus (about 0.5 s) only when first used.
TASKS: dict[str, Task] = {t.name: t for t in _all_tasks()}
