"""Grammar-constrained decoding: a random model (which never writes JSON by itself) always produces answers that
parse and validate, alone, batched and in the scheduler, and the same tokens in all three when greedy."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.grammar import MAX_DIGITS, Constraint, Grammar, check_grammar, json_schema_grammar
from picochat.engine.scheduler import Request, Scheduler
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

pytest.importorskip("llguidance")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.gpt2()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=256)).eval()
    return model, tok


def valid(text: str) -> bool:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return jsonschema_rs.is_valid(SCHEMA, value)


def test_every_answer_parses_and_validates(setup):
    model, tok = setup
    eng = Engine(model, tok)
    grammar = json_schema_grammar(SCHEMA)
    sp = dict(max_tokens=120, grammar=grammar, stop_token_ids=(tok.eot_id,))
    prompts = [tok.encode("Describe a person:"), tok.encode("JSON please"), tok.encode("x")]
    for seed in range(4):
        for r in eng.generate(prompts, temperature=1.0, seed=seed, **sp):
            assert r.finish_reason == "stop" and valid(r.text), r.text
    # unconstrained, the same random model writes no JSON at all
    plain = eng.generate(prompts, temperature=1.0, seed=0, max_tokens=40)
    assert not any(valid(r.text) for r in plain)
    # greedy: alone, batched and in the scheduler give the same tokens
    alone = [eng.generate([p], temperature=0, **sp)[0].token_ids for p in prompts]
    batched = [r.token_ids for r in eng.generate(prompts, temperature=0, **sp)]
    assert alone == batched
    got, done = {}, threading.Event()
    s = Scheduler(model, tok, max_batch=4).start()
    try:
        for i, p in enumerate(prompts):
            def cb(ev, i=i):
                got.setdefault(i, []).extend(ev.token_ids)
                if ev.finish_reason:
                    got.setdefault("finish", {})[i] = ev.finish_reason
                    if len(got["finish"]) == len(prompts):
                        done.set()
            s.submit(Request(p, SamplingParams(temperature=0, **sp), cb))
        assert done.wait(60)
    finally:
        s.stop()
    assert [got[i] for i in range(len(prompts))] == alone and set(got["finish"].values()) == {"stop"}


def test_the_mask_by_hand_and_bad_grammars(setup):
    model, tok = setup
    from llguidance import LLMatcher
    c = Constraint(Grammar(LLMatcher.grammar_from_regex("[0-9]{3}")), tok, model.config.vocab_size, (tok.eot_id,))
    allowed = c.allowed()
    ok = [i for i in allowed.nonzero().flatten().tolist()]
    assert ok and all(tok.decode([i]).isdigit() for i in ok) and tok.encode("7")[0] in ok
    assert tok.eot_id not in ok  # the grammar cannot end yet
    for t in tok.encode("123"):
        c.advance(t)
    assert c.complete
    with pytest.raises(PicochatError, match="cannot be compiled"):
        Constraint(json_schema_grammar({"type": "nonsense"}), tok, model.config.vocab_size, (tok.eot_id,))
    with pytest.raises(PicochatError, match="cannot be compiled"):
        check_grammar(json_schema_grammar({"type": "nonsense"}), tok, model.config.vocab_size, (tok.eot_id,))


def test_json_numbers_are_capped_but_string_digits_are_not(setup):
    model, tok = setup
    V = model.config.vocab_size
    c = Constraint(json_schema_grammar({"type": "object", "properties": {"x": {"type": "number"}, "s": {"type": "string"}},
                                        "required": ["x", "s"], "additionalProperties": False}), tok, V, (tok.eot_id,))
    nine = tok.encode("9")[0]
    for t in tok.encode('{"x": 1.'):
        c.advance(t)
    for _ in range(MAX_DIGITS):
        assert bool(c.allowed()[nine])
        c.advance(nine)
    assert not bool(c.allowed()[nine]) and c.run == MAX_DIGITS  # the 17th digit of the fraction: no
    for t in tok.encode(', "s": "'):
        c.advance(t)
    for _ in range(MAX_DIGITS + 5):  # inside a string, any number of digits
        assert bool(c.allowed()[nine])
        c.advance(nine)


def test_a_checked_grammar_is_compiled_once_and_copied_per_row(setup):
    model, tok = setup
    V = model.config.vocab_size
    g = json_schema_grammar(SCHEMA)
    check_grammar(g, tok, V, (tok.eot_id,))
    assert g.compiled is not None
    a, b = Constraint(g, tok, V, (tok.eot_id,)), Constraint(g, tok, V, (tok.eot_id,))
    assert a.matcher is not g.compiled[1] and a.matcher is not b.matcher
    for t in tok.encode('{"name": "x'):
        a.advance(t)
    assert torch.equal(b.allowed(), Constraint(json_schema_grammar(SCHEMA), tok, V, (tok.eot_id,)).allowed())
    assert not torch.equal(a.allowed(), b.allowed())  # (rows move on their own)
    other = Constraint(g, tok, V, (tok.eot_id, 0))  # other end tokens: compiled afresh, not copied
    assert other.matcher is not g.compiled[1]
