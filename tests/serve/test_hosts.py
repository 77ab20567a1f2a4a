"""load_host: what a served model runs in, and that its compiled decode step finds the attention kernel.

A quantized model under --dtype auto once ran bf16 activations, so its compiled step missed the kernel (it
took fp32 queries only) and ran TorchInductor's loop instead, with the softmax on one thread: serving int4 at
16 clients, 415 tokens/s against 493 with fp32 activations on the means of three alternating pairs
(benchmarks/README.md, "tenth session"). bf16 models (the server's default) ran that loop too, until the
kernel took bf16 queries."""
from __future__ import annotations

import pytest
import torch

from picochat.device import pick_dtype
from picochat.engine.compiled import decoder_for
from picochat.engine.kv_cache import cache_dtype
from picochat.model import vnni
from picochat.serve.hosts import load_host


@pytest.mark.parametrize("quantize", ["int4", None])
def test_a_hosts_compiled_step_runs_the_attention_kernel(tiny_chat_ckpt, quantize, monkeypatch):
    host = load_host(str(tiny_chat_ckpt), quantize=quantize, fast="plain", max_batch=2, max_queue=4, max_context=64)
    m = host.model
    dt = next(m.parameters()).dtype
    if not vnni.available():
        assert dt == pick_dtype("auto", torch.device("cpu"))
        pytest.skip("the VNNI kernels do not run here (no AVX-512 VNNI, or they did not build): "
                    "auto keeps the plain choice")
    if quantize:  # fp32 activations, which the quantized layers' kernels take, on the bf16 cache
        assert dt == torch.float32 and cache_dtype(m, compiled=True) == torch.bfloat16
    elif dt != torch.bfloat16:
        pytest.skip("auto is fp32 on this CPU (no fast bf16): its cache is fp32, which the kernel does not read")
    else:  # a bf16 model has no quantized layer to load the kernels: the compiled step must, before it traces
        monkeypatch.setattr(vnni, "_loaded", False)
        vnni.available.cache_clear()
    # the step the scheduler would take, on its kind of cache: the attention kernel runs inside it
    step = decoder_for(m, "compile")
    c, B, t_k = m.config, 2, 9
    k = [torch.randn(B, c.n_kv_head, 16, c.head_dim).bfloat16() for _ in range(c.n_layer)]
    v = [torch.randn(B, c.n_kv_head, 16, c.head_dim).bfloat16() for _ in range(c.n_layer)]
    cols = torch.full((B,), t_k - 1)
    with torch.profiler.profile() as prof, torch.no_grad():
        step(torch.tensor([[3], [9]]), cols.view(B, 1), torch.ones(B, 1, 1, t_k, dtype=torch.bool), k, v, cols)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("picochat_cpu::decode_attention") == c.n_layer, sorted(calls)[:40]
    if quantize:
        assert calls.get("picochat_cpu::int4_linear", 0) >= c.n_layer
