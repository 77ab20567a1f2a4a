"""The image hook in GPT.forward, the projector, the multimodal model, and where the loss falls."""
import pytest
import torch

from picochat.chat_template import IMAGE_TOKEN, render_conversation
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.multimodal import VLM, ImageEncoder, VisionConfig, pixel_shuffle
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

VIT = dict(image_size=8, channels=3, patch_size=2, n_layer=1, n_head=2, n_embd=16)


def tiny_gpt(pos="rope", seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, pos=pos)).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what colour is the circle? red. which digit is this? 7 " * 20], 300,
                           special_tokens=SPECIAL_TOKENS + [IMAGE_TOKEN])


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_placing_a_tokens_own_embedding_changes_nothing_bit_for_bit(pos):
    m = tiny_gpt(pos)
    idx = torch.randint(0, 64, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3:6] = mask[1, 1:2] = True
    plain, _ = m(idx)
    same, _ = m(idx, embeds=m.tok_emb(idx)[mask], embeds_mask=mask)
    assert torch.equal(plain, same)


def test_text_only_forward_never_takes_the_image_path(monkeypatch):
    """Text-only speed is unchanged: without embeds the hook is one `is None` test, nothing runs."""
    m = tiny_gpt()
    idx = torch.randint(0, 64, (1, 10))
    want, _ = m(idx)
    monkeypatch.setattr(GPT, "_place_embeds", staticmethod(lambda *a: (_ for _ in ()).throw(AssertionError)))
    got, _ = m(idx)
    assert torch.equal(want, got)


def test_placed_embeddings_change_exactly_the_positions_from_the_first_marker_on():
    m = tiny_gpt()
    idx = torch.randint(0, 64, (1, 12))
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4:7] = True
    base, _ = m(idx)
    other, _ = m(idx, embeds=torch.randn(3, 32), embeds_mask=mask)
    assert torch.equal(base[0, :4], other[0, :4])  # causal: nothing before the picture sees it
    assert not torch.allclose(base[0, 4:], other[0, 4:])
    x = m.tok_emb(idx).clone()  # the hook's h_0, written out: embeds at the markers, E[x] elsewhere
    e = torch.randn(3, 32)
    x[mask] = e
    h, _ = m(idx, embeds=e, embeds_mask=mask)
    assert torch.allclose(h, m.lm_head(m.final_norm(_blocks(m, x))), atol=1e-5)


def _blocks(m, x):
    for b in m.blocks:
        x = b(x, rope=(m.rope_cos, m.rope_sin), alibi=None, kv_cache=None, start_pos=0)
    return x


def test_the_hook_refuses_mismatched_embeddings():
    m = tiny_gpt()
    idx = torch.zeros(1, 5, dtype=torch.long)
    mask = torch.tensor([[False, True, True, False, False]])
    with pytest.raises(PicochatError, match="2 marker positions but 3"):
        m(idx, embeds=torch.zeros(3, 32), embeds_mask=mask)
    with pytest.raises(PicochatError, match="embeds must be"):
        m(idx, embeds=torch.zeros(2, 31), embeds_mask=mask)


def test_pixel_shuffle_puts_each_block_of_patches_side_by_side():
    G, s, d = 4, 2, 3
    x = torch.arange(G * G * d, dtype=torch.float32).view(1, G * G, d)
    y = pixel_shuffle(x, s)  # (1, 4, 12)
    for R in range(G // s):
        for C in range(G // s):
            want = torch.cat([x[0, (R * s + i) * G + C * s + j] for i in range(s) for j in range(s)])
            assert torch.equal(y[0, R * (G // s) + C], want)
    assert pixel_shuffle(x, 1) is x


def test_the_encoder_gives_n_tokens_at_the_gpts_width_and_the_vlm_places_them():
    vc = VisionConfig(vit=VIT, pixel_shuffle=2, lm_width=32)
    assert vc.n_tokens == 4  # (8 / 2 / 2)^2
    torch.manual_seed(0)
    enc, gpt = ImageEncoder(vc).eval(), tiny_gpt()
    images = torch.rand(2, 3, 8, 8)
    z = enc(images)
    assert z.shape == (2, 4, 32)
    vlm = VLM(gpt, enc, image_token_id=63)
    idx = torch.randint(0, 60, (2, 10))
    idx[:, 2:6] = 63
    got, _ = vlm(idx, images=images)
    want, _ = gpt(idx, embeds=z.reshape(-1, 32), embeds_mask=idx == 63)
    assert torch.equal(got, want)
    with pytest.raises(PicochatError, match="pixel_shuffle"):
        VisionConfig(vit=VIT, pixel_shuffle=3)


def test_loss_falls_on_the_answer_only_never_on_the_picture_or_the_question(tok):
    from picochat.train.vlm import Renderer, pad_rows
    render = Renderer(tok, n_tokens=4)
    image_id = tok.special_tokens[IMAGE_TOKEN]
    ids, mask = render("what colour is the circle?", "red")
    assert ids.count(image_id) == 4
    learned = [t for t, k in zip(ids, mask) if k]
    assert tok.decode(learned) == "red<|assistant_end|>"
    x, y = pad_rows([(ids, mask), render("what colour is the circle?", "there is no circle")], tok.eot_id)
    images = torch.zeros(2, 3, 8, 8)
    trained = y[0] >= 0
    assert tok.decode(y[0][trained].tolist()) == "red<|assistant_end|>"
    assert not trained[(x[0] == image_id)].any()   # nothing predicted at a marker ...
    assert not (y[0] == image_id).any()            # ... nor a marker ever a target
    # the loss is the answer's cross-entropy alone: changing the question's targets changes nothing
    vc = VisionConfig(vit=VIT, pixel_shuffle=2, lm_width=32)
    torch.manual_seed(0)
    vlm = VLM(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)),
              ImageEncoder(vc), image_id)
    logits, loss = vlm(x, y, images=images)
    keep = y >= 0
    ce = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, ce)
    loss.backward()
    assert vlm.vision.proj_out.weight.grad.abs().sum() > 0  # the picture is learnt through the answer


def test_a_conversation_with_a_picture_needs_a_model_that_sees(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which digit is this?"}]}]
    ids, mask = render_conversation(msgs, tok, image_tokens=3, add_generation_prompt=True)
    assert ids.count(tok.special_tokens[IMAGE_TOKEN]) == 3 and not any(mask)
    with pytest.raises(PicochatError, match="cannot see images"):
        render_conversation(msgs, tok)  # no image_tokens: a text-only model
    plain = Tokenizer.train(["the cat sat on the mat " * 30], 300)
    with pytest.raises(PicochatError, match="cannot see images"):
        render_conversation(msgs, plain, image_tokens=3)
    with pytest.raises(PicochatError, match="only a user message"):
        render_conversation(msgs + [{"role": "assistant", "content": [{"type": "image"}]}], tok, image_tokens=3)
    with pytest.raises(PicochatError, match="parts"):
        render_conversation([{"role": "user", "content": [{"type": "audio"}]}], tok, image_tokens=3)


def test_each_image_token_gets_its_own_learned_position():
    torch.manual_seed(0)
    enc = ImageEncoder(VisionConfig(vit=VIT, pixel_shuffle=2, lm_width=32)).eval()
    assert enc.pos.shape == (4, 32)
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        with_pos = enc(images)
        enc.pos.zero_()
        without = enc(images)
    assert not torch.equal(with_pos, without)
    assert torch.allclose(with_pos - without, (with_pos - without)[:1].expand(2, -1, -1))  # the same for every picture
    plain = ImageEncoder(VisionConfig(vit=VIT, pixel_shuffle=2, lm_width=32, image_pos=False))
    assert plain.pos is None and "pos" not in dict(plain.named_parameters())
