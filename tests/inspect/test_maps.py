"""Attention maps of every model kind: rows are distributions, exactly zero where the mask forbids, and
the very weights the ordinary (SDPA) forward pass multiplies V by: each attention layer's output,
recomputed from the returned map and V, equals the output the fast path produced."""
import json

import pytest
import torch

from picochat.model.attention import Attention
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.seq2seq import CrossAttention, Seq2Seq, Seq2SeqConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _record(model):
    """Forward hooks keeping each attention module's inputs and output: [(module, args, output)]."""
    seen, hooks = [], []
    for m in model.modules():
        if isinstance(m, (Attention, CrossAttention)):
            hooks.append(m.register_forward_hook(lambda mod, args, out: seen.append((mod, args, out.detach()))))
    return seen, hooks


def _values(mod, args) -> torch.Tensor:
    """V per query head (B, nh, T_k, hs), as the module computes it."""
    if isinstance(mod, CrossAttention):
        return args[1][1]  # memory_kv = (K, V), already (B, nh, S, hs)
    x = args[0]
    B, T, _ = x.shape
    qkv = mod.qkv_proj(x).view(B, T, mod.n_head + 2 * mod.n_kv_head, mod.head_dim).transpose(1, 2)
    v = qkv[:, mod.n_head + mod.n_kv_head:]
    return v.repeat_interleave(mod.n_head // mod.n_kv_head, dim=1)


def _recompute(mod, args, w) -> torch.Tensor:
    """o_proj(concat_h(A_h V_h)): the layer output rebuilt from the map."""
    y = w @ _values(mod, args)  # (B, nh, T_q, hs)
    B, nh, T, hs = y.shape
    return mod.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))


def _check_maps_are_the_weights_used(model, run, maps_of):
    """run(return_weights: bool) does a forward pass; maps_of() -> the maps of the attention modules,
    in the order the hooks saw them."""
    seen, hooks = _record(model)
    with torch.no_grad():
        run(False)  # the fast path: SDPA, no weights kept
        fast = list(seen)
        seen.clear()
        run(True)
    for h in hooks:
        h.remove()
    maps = maps_of()
    assert len(maps) == len(fast) > 0
    for (mod, args, out), w in zip(fast, maps):
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(_recompute(mod, args, w), out, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv,pos", [(4, "rope"), (2, "learned"), (1, "alibi")])
def test_gpt_maps_causal_rows_and_equal_the_fast_path(kv, pos):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32,
                            pos=pos)).eval()
    idx = torch.randint(0, 61, (2, 11))
    _check_maps_are_the_weights_used(model, lambda rw: model(idx, return_attention=rw), model.attention_maps)
    for w in model.attention_maps():
        future = torch.triu(torch.ones(11, 11, dtype=torch.bool), 1)
        assert (w[..., future] == 0).all()  # exactly zero, not merely small
        assert (w[..., ~future] > 0).all()


def test_bert_maps_zero_on_padding_and_equal_the_fast_path():
    from picochat.model.bert import BertEncoder
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32, ffn_hidden=64, pos="learned",
                      norm="layernorm", norm_eps=1e-12, norm_position="post", activation="gelu", bias=True)
    enc = BertEncoder(cfg).eval()
    idx = torch.randint(5, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # row 1 has 3 padding positions
    _check_maps_are_the_weights_used(enc, lambda rw: enc(idx, mask, return_attention=rw), enc.attention_maps)
    for w in enc.attention_maps():
        assert (w[1, :, :, 6:] == 0).all() and (w[1, :, :, :6] > 0).all()
        assert (w[0] > 0).all()  # bidirectional: every query sees every real key


def test_seq2seq_maps_encoder_decoder_cross():
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=23, n_embd=32, n_head=4, dropout=0.0)).eval()
    src = torch.tensor([[5, 6, 7, 2], [8, 2, 0, 0]])       # row 1: two padding tokens (pad id 0)
    tgt = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0]])
    order = []

    def maps_in_hook_order():
        d = m.attention_maps()
        order.extend(d["encoder"])
        for s, c in zip(d["decoder"], d["cross"]):
            order.extend([s, c])  # a decoder block runs self-attention, then cross-attention
        return order
    _check_maps_are_the_weights_used(m, lambda rw: m(src, tgt, return_weights=rw), maps_in_hook_order)
    d = m.attention_maps()
    for w in d["encoder"] + d["cross"]:
        assert (w[1, ..., 2:] == 0).all() and (w[1, ..., :2] > 0).all()
    for w in d["decoder"]:
        assert (w[..., torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)] == 0).all()


def test_gpt_maps_view_and_cli_files(tiny_run, tmp_path):
    from picochat.inspect.cli import AttentionConfig, attention
    from picochat.inspect.maps import maps_for
    view = maps_for(str(tiny_run), "the cat sat on the mat")
    g = view.groups["self"]
    assert view.kind == "gpt" and g.causal and g.weights.shape[:2] == (2, 2)
    assert "".join(g.queries) == "the cat sat on the mat"  # token strings read back to the text
    blob = json.dumps(view.to_json())
    assert json.loads(blob)["groups"]["self"]["layers"] == 2
    out = attention(AttentionConfig(model=str(tiny_run), text="the cat sat", out_dir=str(tmp_path / "a"),
                                    layers="1", html=False))
    assert out["kind"] == "gpt" and (tmp_path / "a" / "self.png").stat().st_size > 1000


@pytest.mark.parametrize("bad,msg", [("9", "layers 0..1"), ("x", "comma-separated"), ("", "layers 0..1")])
def test_cli_refuses_bad_layers(tiny_run, tmp_path, bad, msg):
    from picochat.errors import PicochatError
    from picochat.inspect.cli import AttentionConfig, attention
    with pytest.raises(PicochatError, match=msg):
        attention(AttentionConfig(model=str(tiny_run), text="the cat", out_dir=str(tmp_path), layers=bad, html=False))


def test_too_long_text_is_refused(tiny_run):
    from picochat.errors import PicochatError
    from picochat.inspect.maps import maps_for
    with pytest.raises(PicochatError, match="at most 64"):
        maps_for(str(tiny_run), "the cat sat on the mat " * 15)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_maps_equal_the_fast_path_and_cli_overlay(pool, tmp_path):
    from PIL import Image
    from picochat.inspect.cli import AttentionConfig, attention
    from picochat.model.vit import ViT, ViTConfig
    from picochat.vision.maps import vit_maps
    from picochat.vision.train import save_vision
    torch.manual_seed(0)
    model = ViT(ViTConfig(patch_size=2, n_layer=2, n_head=2, n_embd=16, pool=pool)).eval()
    x = torch.rand(2, 1, 8, 8)
    _check_maps_are_the_weights_used(model, lambda rw: model(x, return_attention=rw), model.attention_maps)
    view = vit_maps(model, torch.rand(8, 8) * 16)
    g = view.groups["self"]
    assert g.weights.shape == (2, 2, 16 + (pool == "cls"), 16 + (pool == "cls")) and not g.causal
    assert view.image["grid"] == [4, 4] and view.image["first_key"] == (pool == "cls")
    # the CLI on a saved run and an image file: the grid, the overlay on the picture, the page
    save_vision(model, tmp_path / "run" / "checkpoints" / "step_1")
    (tmp_path / "run" / "latest").write_text("checkpoints/step_1")
    img = Image.new("L", (40, 40), 255)
    img.paste(0, (15, 5, 25, 35))  # a dark bar: a "1" on white paper
    img.save(tmp_path / "one.png")
    out = attention(AttentionConfig(model=str(tmp_path / "run"), text=str(tmp_path / "one.png"),
                                    out_dir=str(tmp_path / "maps")))
    assert out["kind"] == "vit" and out["pngs"][-1].endswith("image.png") and out["html"]
    assert (tmp_path / "maps" / "image.png").stat().st_size > 1000
