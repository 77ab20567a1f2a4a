"""Chat templates and the terminal chat session."""
import io

import jinja2
import pytest
import torch

from picochat.chat import ChatConfig, ChatSession, chat
from picochat.chat_template import render_conversation
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's own template, as stored in its GGUF (tokenizer.chat_template): the oracle
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATION = [{"role": "user", "content": "Bonjour! What's 2+2?\nThanks."},
                {"role": "assistant", "content": "It is 4. 🎉"},
                {"role": "user", "content": "And <|im_end|> is just text here."}]


@pytest.fixture(scope="module")
def tok():
    texts = ["hello world, the cat sat on the mat. " * 20, "Bonjour! What's 2+2? It is 4."]
    return Tokenizer.train(texts, 400).add_special_tokens(["<|im_start|>", "<|im_end|>"])


def test_chatml_matches_the_models_own_jinja_template(tok):
    for gen in (False, True):
        text = jinja2.Template(SMOLLM2_TEMPLATE).render(messages=CONVERSATION, add_generation_prompt=gen)
        # the oracle treats the literal <|im_end|> the user typed as text; ours does too
        pieces = text.split("And <|im_end|> is just text here.")
        want = tok.encode(pieces[0], allowed_special="all") + tok.encode("And <|im_end|> is just text here.") \
            + tok.encode(pieces[1], allowed_special="all")
        ids, mask = render_conversation(CONVERSATION, tok, "chatml", add_generation_prompt=gen,
                                        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        assert ids == want
        assert len(mask) == len(ids)


def test_loss_mask_covers_exactly_the_assistant_answer(tok):
    ids, mask = render_conversation(CONVERSATION, tok, "chatml")
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "It is 4. 🎉<|im_end|>"
    assert learned.count(tok.special_tokens["<|im_end|>"]) == 1


def test_picochat_template_and_its_mask():
    tok = Tokenizer.train(["the cat sat on the mat " * 30], 300)
    ids, mask = render_conversation(CONVERSATION[:2], tok)  # picked from the vocabulary
    assert ids[0] == tok.eot_id
    sp = tok.special_tokens
    assert ids[1] == sp["<|user_start|>"] and sp["<|assistant_start|>"] in ids
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 4. 🎉<|assistant_end|>"
    gen, _ = render_conversation(CONVERSATION[:1], tok, add_generation_prompt=True)
    assert gen[-1] == sp["<|assistant_start|>"]


def test_bad_messages_are_clear_errors(tok):
    with pytest.raises(PicochatError, match="role"):
        render_conversation([{"role": "robot", "content": "x"}], tok, "chatml")
    with pytest.raises(PicochatError, match="system message"):
        render_conversation([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], tok, "chatml")
    with pytest.raises(PicochatError, match="chat special tokens"):
        render_conversation(CONVERSATION, Tokenizer.gpt2())


def test_session_keeps_the_cache_between_turns_and_handles_commands():
    tok = Tokenizer.train(["the cat sat on the mat " * 30], 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    s = ChatSession(model, tok, ChatConfig(model="-", temperature=0, max_tokens=8, repetition_penalty=None))
    out = []
    s.reply("hello there", out.append)
    first = s.engine.last_prefill_tokens
    s.reply("and the cat?", out.append)
    full, _ = render_conversation(s.messages[:-1], tok, add_generation_prompt=True)
    assert s.engine.last_prefill_tokens < len(full) and first > 0  # only the new turn ran
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.command("/temperature 0.5") == "temperature = 0.5" and s.cfg.temperature == 0.5
    assert "needs a number" in s.command("/top_p 2")
    assert "unknown command" in s.command("/nope")
    assert s.command("/clear") and s.messages == []


@pytest.mark.slow
def test_smollm2_answers_paris_in_the_terminal_chat():
    lines = iter(["What is the capital of France?", "/quit"])
    out = io.StringIO()
    chat(ChatConfig(temperature=0, max_tokens=24), input_fn=lambda prompt: next(lines), out=out)
    assert "Paris" in out.getvalue()


@pytest.mark.parametrize("dtype,quantize,shown", [("fp32", None, "fp32"), ("bf16", None, "bf16"), ("auto", None, None),
                                                  ("fp32", "int8", "int8 weights, fp32 activations"),
                                                  ("bf16", "int4", "int4 weights, bf16 activations"),
                                                  ("auto", "int4", None)])
def test_chat_runs_in_the_dtype_asked_and_says_so(tmp_path, dtype, quantize, shown):
    """--dtype (fp32 by default): auto is what `picochat serve` picks (bf16 on a CPU with fast bf16, else
    fp32); with --quantize it is the activations' dtype (auto: fp32 where the VNNI kernels run). The banner
    names what runs."""
    from picochat.checkpoints.io import save_model
    from picochat.device import pick_dtype
    tok = Tokenizer.train(["the cat sat on the mat " * 30], 300)
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)), tmp_path, tok)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    if shown is None:
        auto = names[pick_dtype("auto", torch.device("cpu"), quantize)]
        shown = f"{quantize} weights, {auto} activations" if quantize else auto
    lines, out = iter(["the cat", "/quit"]), io.StringIO()
    chat(ChatConfig(model=str(tmp_path), dtype=dtype, quantize=quantize, temperature=0, max_tokens=3),
         input_fn=lambda prompt: next(lines), out=out)
    assert f"parameters, {shown}, " in out.getvalue(), out.getvalue()[:300]


def test_auto_dtype_under_quantized_weights_is_what_the_cpu_kernels_take():
    """auto with --quantize: fp32 activations where the VNNI kernels run (they take fp32 and round it to int8
    themselves; bf16 would cast around every layer and miss the decode-attention kernel); without
    --quantize, auto is unchanged."""
    from picochat.device import cpu_has_fast_bf16, pick_dtype
    from picochat.model import vnni
    cpu = torch.device("cpu")
    plain = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert pick_dtype("auto", cpu) == pick_dtype("auto", cpu, None) == pick_dtype("auto", cpu, "none") == plain
    for q in ("int8", "int4"):
        assert pick_dtype("auto", cpu, q) == (torch.float32 if vnni.available() else plain)
        assert pick_dtype("bf16", cpu, q) == torch.bfloat16  # asked for by name: honoured
