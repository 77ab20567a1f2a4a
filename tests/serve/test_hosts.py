"""load_host: what a served model runs in. A quantized model under --dtype auto once ran bf16 activations,
so its compiled decode step missed the attention kernel (it takes fp32 queries on the bf16 cache) and ran
TorchInductor's loop instead, with the softmax on one thread: serving int4 at 16 clients, 415 tokens/s
against 493 with fp32 activations on the means of three alternating pairs (benchmarks/README.md, "tenth
session")."""
from __future__ import annotations

import pytest
import torch

from picochat.device import pick_dtype
from picochat.engine.compiled import decoder_for
from picochat.engine.kv_cache import cache_dtype
from picochat.model import vnni
from picochat.serve.hosts import load_host


def test_a_quantized_host_runs_what_the_cpu_kernels_take(tiny_chat_ckpt):
    host = load_host(str(tiny_chat_ckpt), quantize="int4", fast="plain", max_batch=2, max_queue=4, max_context=64)
    m = host.model
    if not vnni.available():
        assert next(m.parameters()).dtype == pick_dtype("auto", torch.device("cpu"))
        pytest.skip("the VNNI kernels do not run here (no AVX-512 VNNI, or they did not build): auto keeps the plain choice")
    assert next(m.parameters()).dtype == torch.float32 and cache_dtype(m, compiled=True) == torch.bfloat16
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
    assert calls.get("picochat_cpu::int4_linear", 0) >= c.n_layer
