"""The AVX-512 VNNI int4/int8 kernels (picochat/model/vnni.py, kernels/quant_vnni.cpp): layouts, the
arithmetic against a float64 reference of the same rounding, inside torch.compile, and the fallback."""
import os
import subprocess
import sys

import pytest
import torch

from picochat.model import vnni
from picochat.model.quant import Int4Linear, Int8Linear, quantize_groups_int4, quantize_rows_int8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_vnni = pytest.mark.skipif(not vnni.available(), reason="no AVX-512 VNNI on this CPU (or no compiler)")


def round_activations(x: torch.Tensor):
    """What the kernel does to x (M, K): blocks of 32, a = max|x| / 127, Xq = round(x * 127 / max|x|)."""
    M, K = x.shape
    b = x.view(M, K // 32, 32)
    amax = b.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # fp32, as in C++
    xq = torch.round(b * inv[..., None])  # half to even, as _mm512_cvtps_epi32
    return xq.double(), (amax / 127.0).double()


def test_layouts_round_trip():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (48, 96))
    s, lo = torch.rand(48, 3) / 50, -torch.rand(48, 3) / 10
    q2, s2, lo2 = vnni.unpack_int4(vnni.pack_int4(q, s, lo), 48, 96)
    assert torch.equal(q2.long(), q)
    assert torch.equal(s2, s.half().float()) and torch.equal(lo2, lo.half().float())
    q8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    assert torch.equal(vnni.unpack_int8(vnni.pack_int8(q8), 32, 64), q8)
    assert vnni.fits(48, 96) and not vnni.fits(40, 96) and not vnni.fits(48, 80)


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 19])  # every register block (1-8 rows), passes of 8 and the rest
def test_int4_kernel_is_its_formula(rows):
    torch.manual_seed(rows)
    N, K = 64, 160
    q, s, lo = quantize_groups_int4(torch.randn(N, K), 32, torch.float16)
    x = torch.randn(rows, K) * torch.linspace(0.1, 3, K)  # blocks of different ranges
    x[0, :32] = 0  # a block of zeros: scale 0, no NaN
    y = vnni.int4_linear(x, vnni.pack_int4(q, s, lo), N)
    xq, a = round_activations(x)  # (M, G, 32), (M, G)
    qg = q.view(N, K // 32, 32).double()
    dot = torch.einsum("mgk,ngk->mng", xq, qg)
    ref = (a[:, None] * (s.double()[None] * dot + lo.double()[None] * xq.sum(-1)[:, None])).sum(-1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y).all()


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13])
def test_int8_kernel_is_its_formula(rows):
    torch.manual_seed(rows)
    N, K = 48, 96
    q, s = quantize_rows_int8(torch.randn(N, K))
    x = torch.randn(rows, K)
    y = vnni.int8_linear(x, vnni.pack_int8(q), s)
    xq, a = round_activations(x)
    dot = torch.einsum("mgk,ngk->mng", xq, q.view(N, K // 32, 32).double())
    ref = s.double() * (a[:, None] * dot).sum(-1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_layers_take_the_kernels_and_stay_close_to_float():
    """Int4Linear/Int8Linear pick VNNI where it runs; against the float layer they are as close as
    PyTorch's weight-only kernels (rounding the activations adds ~1/254 of a block's range)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 96)
    x = torch.randn(4, 192)
    for make in (lambda k: Int4Linear(lin.weight, lin.bias, kernel=k), lambda k: Int8Linear(lin.weight, lin.bias, kernel=k)):
        fast, ref = make(None).eval(), make("torch").eval()
        assert fast.kernel == "vnni" and ref.kernel == "torch"
        with torch.no_grad():
            want = lin(x)
            err_fast = (fast(x) - want).norm() / want.norm()
            err_ref = (ref(x) - want).norm() / want.norm()
        assert err_fast < 1.5 * err_ref + 0.01, (err_fast, err_ref)


@needs_vnni
def test_the_ops_compile_with_symbolic_rows():
    torch.manual_seed(0)
    layer = Int4Linear(torch.randn(64, 96), None).eval()
    f = torch.compile(lambda x: torch.relu(layer(x)) * 2, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (1, 5, 9):
            x = torch.randn(rows, 96)
            torch.testing.assert_close(f(x), torch.relu(layer(x)) * 2)


@needs_vnni
def test_bad_inputs_are_refused_by_name():
    p = vnni.pack_int8(torch.zeros(16, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="float32"):
        vnni.int8_linear(torch.zeros(2, 64, dtype=torch.bfloat16), p, torch.ones(16))
    with pytest.raises(RuntimeError, match="do not match"):
        vnni.int8_linear(torch.zeros(2, 96), p, torch.ones(16))


def _probe(env: dict) -> subprocess.CompletedProcess:
    code = ("from picochat.model import vnni; from picochat.model.quant import Int4Linear; import torch;"
            "print(vnni.available(), Int4Linear(torch.randn(32, 64), None).kernel)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_switched_off_or_unbuildable_it_falls_back_to_torch(tmp_path):
    off = _probe({"PICOCHAT_VNNI": "0"})
    assert off.stdout.split() == ["False", "torch"], off.stderr
    if vnni.cpu_has_vnni():  # a compiler that fails: said once, and the layers keep PyTorch's kernels
        broken = _probe({"CXX": "false", "PICOCHAT_KERNELS": str(tmp_path)})
        assert broken.stdout.split() == ["False", "torch"] and "did not build" in broken.stderr, broken.stderr


@needs_vnni
@pytest.mark.parametrize("shape", [(1, 9, 3, 37, 64), (8, 9, 3, 200, 64), (2, 4, 4, 5, 32), (3, 12, 2, 70, 128),
                                   (2, 4, 1, 17, 16)])  # (B, nh, nkv, T_k, d_k): GQA groups of 3, 1, 6 and 4
def test_decode_attention_is_single_query_attention(shape):
    """The kernel against the Python reference on the same bf16 cache (read as fp32), with and without a
    padding mask, on views of a longer store as the engine's cache hands them out; and with bf16 queries
    against the reference's bf16 path."""
    from picochat.model.attention import single_query_attention
    B, nh, nkv, T, D = shape
    torch.manual_seed(T)
    q = torch.randn(B, nh, 1, D)
    store = torch.randn(2, B, nkv, T + 9, D).bfloat16()
    k, v = store[0, :, :, :T], store[1, :, :, :T]
    mask = torch.rand(B, 1, 1, T) > 0.3
    mask[..., -1] = True  # every row attends to its own new key
    for m in (mask, None):
        assert vnni.decode_attention_fits(q, k, v, m)
        want = single_query_attention(q, k.float(), v.float(), m)
        torch.testing.assert_close(vnni.decode_attention(q, k, v, m), want, rtol=1e-5, atol=2e-6)
    qb = q.bfloat16()  # a bf16 model's queries: rounded where its Python path rounds (scores, weights, output)
    for m in (mask, None):
        assert vnni.decode_attention_fits(qb, k, v, m)
        got, want = vnni.decode_attention(qb, k, v, m), single_query_attention(qb, k, v, m)
        assert got.dtype == torch.bfloat16
        # where the sums' order tips a score's or a weight's rounding by one bf16 ulp, an output moves by ~1e-3
        # (relative tolerance alone fails on outputs near 0); on average they agree to ~1e-6
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=4e-3)
        assert float((got.float() - want.float()).abs().mean()) < 1e-4
    assert not vnni.decode_attention_fits(q, k.float(), v.float(), None)
    assert not vnni.decode_attention_fits(q, k, v, mask.float())


@needs_vnni
def test_the_attention_layer_takes_the_kernel_on_a_bf16_cache(monkeypatch):
    """A decode step on a bf16 KVCache under fp32 activations (a quantized model's compiled step) gives,
    through the kernel, what casting the cache to fp32 for the Python attention gives."""
    from picochat.engine.kv_cache import KVCache
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=96,
                            pos="rope", norm="rmsnorm", activation="swiglu")).eval()
    ids = torch.randint(0, 97, (2, 12))
    calls = []
    real = vnni.decode_attention
    monkeypatch.setattr(vnni, "decode_attention", lambda *a: calls.append(1) or real(*a))
    outs = []
    for kernel in (True, False):
        monkeypatch.setattr(vnni, "_loaded", kernel)
        cache = KVCache(model.config.n_layer, 2, model.config.n_kv_head, model.config.head_dim, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            model(ids[:, :-1], kv_cache=cache)
            outs.append(model(ids[:, -1:], kv_cache=cache, start_pos=11)[0])
    assert len(calls) == model.config.n_layer  # the kernel ran in the first pass only, once a layer
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@needs_vnni
def test_nans_reach_the_output_and_odd_inputs_are_refused():
    """A NaN input must come out as NaN (not as a plausible number), in both matmuls and in attention;
    a flat int4 group (scale 0) stays exact; shapes the kernel cannot take fall back or raise, never crash."""
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    w = torch.randn(32, 64)
    w[1] = 0.5  # flat groups: every weight its group's minimum
    for layer in (Int8Linear(w, None).eval(), Int4Linear(w, None).eval()):
        with torch.no_grad():
            y = layer(x)
        assert y[0].isnan().all() and y[1].isfinite().all()
        torch.testing.assert_close(y[1, 1], x[1].sum() * 0.5, rtol=0.02, atol=0.05)
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 7, 16).bfloat16()
    k[0, 0, 2, 0] = float("nan")
    y = vnni.decode_attention(q, k, k.clone(), None)
    assert y[0, :2].isnan().all() and y[0, 2:].isfinite().all() and y[1].isfinite().all()
    assert vnni.decode_attention_fits(q, k, k, torch.ones(1, 1, 1, 7, dtype=torch.bool))  # one mask for all rows
    assert not vnni.decode_attention_fits(q, k, k, torch.ones(2, 1, 1, 1, dtype=torch.bool))  # broadcast keys
    empty = torch.zeros(2, 0, 7, 16).bfloat16()
    assert not vnni.decode_attention_fits(q, empty, empty, None)
    with pytest.raises(RuntimeError, match="nh a multiple of nkv"):
        vnni.decode_attention(q, empty, empty, None)


@needs_vnni
def test_fine_inputs_round_twice_for_the_lm_head():
    """`fine`: x ~= a Xq + a' Xq' (the rounding error rounded again): ~1/254 of the error of rounding once.
    Quantized models give it to the LM head only, and the cache's empty skeleton does the same."""
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    from picochat.model.quant import quantize_int4, quantized_skeleton
    torch.manual_seed(0)
    q, s = quantize_rows_int8(torch.randn(64, 96))
    p = vnni.pack_int8(q)
    x = torch.randn(9, 96)  # 9 rows: 18 kernel rows, three passes of up to 8
    exact = x.double() @ (q.double() * s.double()[:, None]).t()
    once = (vnni.int8_linear(x, p, s).double() - exact).norm() / exact.norm()
    twice = (vnni.int8_linear(x, p, s, True).double() - exact).norm() / exact.norm()
    assert twice < once / 50, (float(once), float(twice))
    cfg = ModelConfig(vocab_size=96, block_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, pos="rope",
                      norm="rmsnorm", activation="swiglu")
    for model in (quantize_int4(GPT(cfg)), quantized_skeleton(GPT(cfg), "int4")):
        fine = {n for n, m in model.named_modules() if getattr(m, "fine_inputs", False)}
        assert fine == {"lm_head"} and model.lm_head.kernel == "vnni"


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 9, 19])
def test_fine_margin_rounds_twice_only_near_each_rows_top(rows):
    """`margin`: the tiles of 16 outputs whose largest once-rounded output is within `margin` of its row's
    largest get exactly the twice-rounded outputs, the others exactly the once-rounded ones, whatever the
    threads' timing (the kernel picks tiles by a running largest shared between threads, then puts back):
    512 tiles, so the threads take 16 runs of 32 from their shared counter in an order that varies."""
    torch.manual_seed(rows)
    N, K = 16 * 512, 96
    q, s = quantize_rows_int8(torch.randn(N, K) * torch.linspace(0.2, 3, N)[:, None])  # a spread of logits
    p = vnni.pack_int8(q)
    x = torch.randn(rows, K) * 3
    once, twice = vnni.int8_linear(x, p, s), vnni.int8_linear(x, p, s, True)
    assert not torch.equal(once, twice)
    tile_top = once.view(rows, -1, 16).amax(-1)  # (rows, tiles)
    for margin in (0.0, 5.0, 20.0, 1e9):
        near = tile_top >= once.amax(-1, keepdim=True) - margin
        want = torch.where(near.repeat_interleave(16, -1), twice, once)
        for _ in range(8):
            assert torch.equal(vnni.int8_linear(x, p, s, True, margin), want), margin
    assert torch.equal(vnni.int8_linear(x, p, s, True, float("inf")), twice)  # inf: every tile, as None
    near = tile_top >= once.amax(-1, keepdim=True) - 20.0
    assert 0 < near.float().mean() < 1  # both kinds of tile were exercised
    x[0, 5] = float("nan")
    y = vnni.int8_linear(x, p, s, True, 5.0)
    assert y[0].isnan().all() and y[1:].isfinite().all()
    with pytest.raises(RuntimeError, match="margin needs fine=True"):
        vnni.int8_linear(x, p, s, False, 5.0)
    with pytest.raises(RuntimeError, match="margin needs fine=True and a value >= 0"):
        vnni.int8_linear(x, p, s, True, -1.0)


@needs_vnni
def test_the_lm_head_rounds_twice_within_head_margin():
    from picochat.model.quant import HEAD_MARGIN
    torch.manual_seed(0)
    w = torch.randn(16 * 64, 64)
    head = Int8Linear(w, None, fine_inputs=True).eval()
    x = torch.randn(4, 64) * 4
    with torch.no_grad():
        y = head(x)
    assert torch.equal(y, vnni.int8_linear(x, head.weight_q8, head.scale, True, HEAD_MARGIN))
    assert not torch.equal(y, vnni.int8_linear(x, head.weight_q8, head.scale, True))  # far tiles: rounded once


@needs_vnni
def test_each_row_comes_out_the_same_whatever_block_it_is_in():
    """A row's outputs do not depend on the rows beside it: blocks of 1-3 rows split each row's integer sums
    over 2-4 accumulators (exact: int32), blocks of 4-8 do not, and every block size gives the same bits."""
    torch.manual_seed(0)
    N, K = 64, 160
    q, s, lo = quantize_groups_int4(torch.randn(N, K), 32, torch.float16)
    p4 = vnni.pack_int4(q, s, lo)
    q8, s8 = quantize_rows_int8(torch.randn(N, K))
    p8 = vnni.pack_int8(q8)
    x = torch.randn(13, K)
    for f in (lambda x: vnni.int4_linear(x, p4, N), lambda x: vnni.int8_linear(x, p8, s8),
              lambda x: vnni.int8_linear(x, p8, s8, True), lambda x: vnni.int8_linear(x, p8, s8, True, 3.0)):
        whole = f(x)
        for rows in (1, 2, 3, 5):
            parts = torch.cat([f(x[i:i + rows]) for i in range(0, len(x), rows)])
            assert torch.equal(parts, whole), rows
