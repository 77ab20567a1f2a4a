"""The decode step, compiled: one new token per running row through the whole model as one program.

Eager PyTorch runs a SmolLM2-135M decode step as ~5-7k small ops (benchmarks/README.md's profile): the
matmuls that stream the weights take about half of a step, launching and looping over tiny tensors the
rest. TorchInductor traces `GPT.forward` for T = 1 and fuses everything between two matmuls (norms,
RoPE, the softmax, SiLU, the residual adds) into generated C++ loops, so the step is the matmuls plus
little else. The model's code is unchanged: this module only feeds it a cache whose writes are tensor
indexing, so nothing in the step depends on Python integers that change from step to step.

    decode_step(idx (B, 1), positions (B, 1), mask (B, 1, 1, T_k), K, V, cols (B,)) -> logits (B, 1, V)
    prefill_step(idx (1, T), positions (1, T), mask (1, 1, T, T_k), K, V, cols (1, T)) -> logits (1, 1, V)

The second is the scheduler's: a chunk of T >= 2 tokens of one prompt (`picochat serve` compiles it
after the first, before it answers), the same model code on the same kind of cache.

Row b writes its new K/V at column cols[b] of every layer's store (B', nkv, capacity, hs) and attends to
columns 0..T_k-1 where mask[b] is True. Both caches fit this: the engine's KVCache (every row at one
column, padding masked) and the scheduler's SlotCache (each row at its own length). Batch size, T_k and
the capacity are symbolic (marked in `_warm_up`), so one graph serves every step; dynamo keeps sizes of
1 apart, so batch 1 has a graph of its own. Heads and head size stay constants. The plain eager model
stays the reference: tests/engine/test_fast_path*.py check that fp32 (and the tiny test models) give
exactly its greedy tokens, and that bf16 and int4 stay as close to fp32 as their eager paths do.

Where the time goes after compiling (SmolLM2 int4, batch 1: benchmarks/README.md's profile): the
matmuls about half, the ~120 fused kernels between them a quarter. Dynamo checks ~2,900 guards before
every call, all but ~130 of them on the model (its ~300 weights' metadata, every module's type, hooks
and integers): ~0.9 ms of an 11 ms step. A model does not change under its compiled step, so the step keeps
only the guards on its inputs and on global state (`_outside_the_model`); a model whose `layout` has
changed since (quantized in place, cast, hooked, retied) gets a new step, which Engine and Scheduler ask
`decoder_for` for before each request. Changing a model in the middle of a request is not supported.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import types
import warnings
import weakref
from typing import Optional

import torch

from ..errors import PicochatError
from ..model import vnni
from ..model.attention import causal_mask
from .kv_cache import cache_dtype

FAST_CHOICES = ("auto", "compile", "plain")
# a one-off job shorter than this decodes faster plain: compiling costs 20-60 s, and saves ~10-20 ms a
# token on SmolLM2-135M (picochat generate's auto)
COMPILE_WORTH_TOKENS = 2000
WARM_BATCHES = (1, 2)  # the graphs compiled ahead: batch 1, and every batch > 1 (dynamo specialises size 1)


def _outside_the_model(entries) -> list[bool]:
    """torch.compile's guard_filter_fn: keep a guard unless it is on the `model` argument (the rest:
    the cache tensors' shapes and dtypes, grad mode, globals). SmolLM2 int4 at batch 1 and 513-640 keys,
    against the same step with every guard in one process (`python benchmarks/guards.py`): 10.1-10.6 ms a
    step against 10.9-11.3, the same tokens."""
    return [re.match(r"model\b", e.name) is None for e in entries]


def layout(model) -> tuple:
    """What the compiled step was traced for, beyond its inputs: the config; every module's name, type,
    mode and hooks; every weight's name, dtype, shape, strides and device, and which weights are one
    tensor (tied). Not covered: a module's other Python attributes changed by hand (a norm's eps)."""
    first: dict[int, str] = {}
    mods = tuple((n, type(m), m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
                 for n, m in model.named_modules())
    tensors = tuple((n, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.device, first.setdefault(id(t), n))
                    for n, t in [*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False)])
    return (repr(getattr(model, "config", None)),) + mods + tensors


class _StepCache:
    """KVCache.update for one decode step (cols (B,): a column per row) or a prompt's chunk (cols (B, T)),
    on tensors only (see the module docstring)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], cols: torch.Tensor, t_k: int):
        self.k, self.v, self.cols, self.t_k = k, v, cols, t_k
        self.rows = torch.arange(cols.size(0), device=cols.device)
        if cols.dim() == 2:  # (B, 1): broadcast against cols (B, T)
            self.rows = self.rows.view(-1, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, nkv, T, hs) -> this layer's (B, nkv, T_k, hs) K and V, the new columns included."""
        B = k.size(0)
        # advanced indices first: (B, nkv, hs) a step, (B, T, nkv, hs) a chunk; cast, as index_put takes no
        # other dtype (a bf16 cache)
        new_k, new_v = (k[:, :, 0], v[:, :, 0]) if self.cols.dim() == 1 else (k.transpose(1, 2), v.transpose(1, 2))
        self.k[layer][self.rows, :, self.cols] = new_k.to(self.k[layer].dtype)
        self.v[layer][self.rows, :, self.cols] = new_v.to(self.v[layer].dtype)
        return self.k[layer][:B, :, :self.t_k], self.v[layer][:B, :, :self.t_k]


def decode_step(model, idx, positions, mask, k, v, cols):
    """One token per row through `model` (the function that is compiled; eager, it is the plain step)."""
    cache = _StepCache(k, v, cols, mask.size(-1))
    return model(idx, kv_cache=cache, positions=positions, attn_mask=mask)[0]


def prefill_step(model, idx, positions, mask, k, v, cols):
    """T >= 2 prompt tokens per row, written at columns cols (B, T); only the last position's logits (B, 1, V).
    mask (B, 1, T, T_k): causal, row by row (the scheduler's chunk of a prompt after its cached prefix)."""
    cache = _StepCache(k, v, cols, mask.size(-1))
    return model(idx, kv_cache=cache, positions=positions, attn_mask=mask, last_logits_only=True)[0]


def unsupported(model) -> Optional[str]:
    """Why `model` cannot take the compiled step, or None if it can."""
    c = getattr(model, "config", None)
    if c is None or not hasattr(model, "blocks"):
        return "not a picochat GPT"
    if c.pos == "alibi":
        return "ALiBi biases are built from Python positions"
    if getattr(c, "moe_experts", 0):
        return "mixture-of-experts routing is data-dependent"
    if next(model.parameters()).device.type != "cpu":
        return "the compiled step is for CPUs (on GPUs the plain step is already kernel-bound)"
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "TorchInductor needs a C++ compiler (g++), none found"
    return None


def slower_compiled(model) -> bool:
    """fp32 matmuls: SmolLM2 fp32 decodes at 17.8-19.8 tokens/s compiled, 22.3-22.7 plain (benchmarks/decode.py).
    The plain step runs them on oneDNN (model/layers.py), which TorchInductor cannot lower with symbolic
    sizes, and its own fp32 GEMM is slower; bf16, int8 and int4 models gain 1.4-1.6x. `auto` leaves fp32
    models plain; "compile" still compiles them (tested: the same greedy tokens)."""
    return any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules())


class DecodeStep:
    """`decode_step` compiled for one model, or None of it: see `decoder_for`.

    Compiling takes 20-120 s on 2 cores (TorchInductor's disk cache makes later processes faster). It
    runs in a background thread, started when an engine or scheduler is made, so it overlaps with
    whatever comes before the first answer (loading, a person typing); the first decode step then
    waits for it (`usable`). It does not decode on the plain path meanwhile: tracing holds Python's
    GIL for seconds at a time, and an eager step, which gives the GIL up at each of its thousands of
    small ops, crawled 40x slower beside it (measured: 10 tokens in 17 s instead of 0.5 s).
    """

    def __init__(self, model):
        self.model = model
        self.layout = layout(model)  # a new step is made if it changes (the guards on the model are off): fits()
        self.done = threading.Event()  # compiling ended, well (error None) or not
        self.error: Optional[str] = None
        self._fn = None  # made in the background thread (_warm_up): torch.compile's first use imports ~1 s of
        # dynamo and Inductor, which `picochat chat` would otherwise pay before its prompt shows
        self._thread: Optional[threading.Thread] = None
        # prompts (prefill_step), for the scheduler: compiled after the decode graphs, on request (start_prefill)
        self.prefill_done = threading.Event()
        self.prefill_error: Optional[str] = None
        self._prefill_fn = None
        self._prefill_thread: Optional[threading.Thread] = None
        self._prefill_lock = threading.Lock()

    def _compiled(self, fn=decode_step):
        # a code object of its own: dynamo keeps compiled graphs, and counts them against its recompile
        # limit (8), per code object; shared, a process with a few models (tests; RL's policy and
        # reference) would hit the limit and, fullgraph, fail.
        # emulate_precision_casts: round bf16 intermediates inside fused kernels where eager rounds them (by
        # default TorchInductor keeps them in fp32); sums still run in another order, so a bf16 model's
        # greedy tokens can part from eager's at a near-tie (tests/engine/test_fast_path_smollm2.py)
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(self):x}")
        return torch.compile(types.FunctionType(code, fn.__globals__), fullgraph=True,
                             options={"emulate_precision_casts": True, "guard_filter_fn": _outside_the_model})
        # (sizes made symbolic in _warm_up and _warm_up_prefill)

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 k: list[torch.Tensor], v: list[torch.Tensor], cols: torch.Tensor) -> torch.Tensor:
        return self._fn(self.model, idx, positions, mask, k, v, cols)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                k: list[torch.Tensor], v: list[torch.Tensor], cols: torch.Tensor) -> torch.Tensor:
        """prefill_step compiled (after start_prefill, once prefill_ready()); batch 1, T >= 2."""
        if not self.prefill_ready():
            raise PicochatError("the compiled prefill step is not ready (start_prefill, then prefill_ready())"
                                + (f": {self.prefill_error}" if self.prefill_error else ""))
        return self._prefill_fn(self.model, idx, positions, mask, k, v, cols)

    def fits(self, model) -> bool:
        """Is `model` (still) what this step was traced for? Engine and Scheduler ask before each request
        (~1 ms on SmolLM2), decoder_for before handing the step out."""
        return model is self.model and layout(model) == self.layout

    def usable(self) -> bool:
        """Wait until compiling has ended; True if it worked (else the caller takes the plain step)."""
        self.done.wait()
        return self.error is None

    def start(self, wait: bool = False) -> "DecodeStep":
        """Compile in the background (once); wait=True blocks until done and raises if it failed."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._warm_up, name="picochat-compile", daemon=True)
            self._thread.start()
        if wait:
            self._thread.join()
            if self.error:
                raise PicochatError(f"compiling the decode step failed: {self.error}")
        return self

    def start_prefill(self, wait: bool = False) -> "DecodeStep":
        """Compile prefill_step too, in the background, once the decode graphs are done (an answer waits for
        those, never for this one). The scheduler's prompts run eager until prefill_ready(). The eager model
        spends ~11 ms of a chunk on its thousands of small ops whatever the chunk's length (SmolLM2 int4, 16
        new tokens after a cached system prompt: 21-24 ms eager, 13-17 compiled; benchmarks/prefill_chunk.py).
        wait=True blocks until it is done; a failure only warns (prompts stay eager)."""
        self.start()
        with self._prefill_lock:  # (two callers must not start two compiles)
            if self._prefill_thread is None:
                self._prefill_thread = threading.Thread(target=self._warm_up_prefill,
                                                        name="picochat-compile-prefill", daemon=True)
                self._prefill_thread.start()
        if wait:
            self._prefill_thread.join()
        return self

    def prefill_ready(self) -> bool:
        """Has prefill_step compiled (never waits)?"""
        return self.prefill_done.is_set() and self.prefill_error is None

    def prefill_failed(self, error: str) -> None:
        """The compiled prefill raised while running: prompts go eager from now on."""
        self.prefill_error = error[:500]
        warnings.warn(f"picochat: the compiled prefill step failed, prompts run eager from now on: "
                      f"{self.prefill_error}")

    @torch.no_grad()
    def _warm_up_prefill(self) -> None:
        self.done.wait()
        if self.error is not None:  # (it warned already) prompts stay eager
            self.prefill_error = "the decode step did not compile"
            self.prefill_done.set()
            return
        try:
            c, dtype = self.model.config, cache_dtype(self.model, compiled=True)
            self._prefill_fn = self._compiled(prefill_step)
            start, T = 4, 8  # a chunk of 8 tokens after 4 cached ones, in a store of 16 columns
            k = [torch.zeros(1, c.n_kv_head, 16, c.head_dim, dtype=dtype) for _ in range(c.n_layer)]
            v = [torch.zeros(1, c.n_kv_head, 16, c.head_dim, dtype=dtype) for _ in range(c.n_layer)]
            cols = torch.arange(start, start + T).view(1, T)
            mask = causal_mask(T, start + T).view(1, 1, T, start + T)
            idx = torch.zeros(1, T, dtype=torch.long)
            # symbolic: the chunk's length, T_k, the capacity (batch 1 only: a chunk is one prompt's)
            for t in (idx, cols):
                torch._dynamo.mark_dynamic(t, 1)
            torch._dynamo.mark_dynamic(mask, [2, 3])
            for t in k + v:
                torch._dynamo.mark_dynamic(t, 2)
            self._prefill_fn(self.model, idx, cols, mask, k, v, cols)
        except Exception as e:  # prompts stay on the eager model
            self.prefill_error = f"{type(e).__name__}: {e}"[:500]
            warnings.warn(f"picochat: compiling the prefill step failed, prompts run eager: {self.prefill_error}")
        finally:
            self.prefill_done.set()

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Compile both graphs on a scratch cache (never a caller's): batch 1, and any batch > 1."""
        c, dtype = self.model.config, cache_dtype(self.model, compiled=True)
        try:
            if dtype == torch.bfloat16 and next(self.model.parameters()).device.type == "cpu":
                vnni.available()  # the decode-attention kernel, loaded before tracing looks for it (bf16 models
                # have no quantized layer that loads it; 10-20 s the first time on a machine, once)
            self._fn = self._compiled()
            for B in WARM_BATCHES:
                for t_k in (8, 9):  # a second length: one graph covers every T_k
                    shape = (B, c.n_kv_head, 16, c.head_dim)
                    k = [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layer)]
                    v = [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layer)]
                    cols = torch.full((B,), t_k - 1, dtype=torch.long)
                    idx, mask = torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, 1, t_k, dtype=torch.bool)
                    positions = cols.view(B, 1)
                    # symbolic: the batch (B > 1 only: dynamo keeps sizes of 1 apart), T_k, the capacity;
                    # the heads and head size stay constants, which the generated loops unroll and vectorise
                    for t in k + v:
                        torch._dynamo.mark_dynamic(t, [0, 2] if B > 1 else [2])
                    torch._dynamo.mark_dynamic(mask, [0, 3] if B > 1 else [3])
                    if B > 1:
                        for t in (idx, positions, cols):
                            torch._dynamo.mark_dynamic(t, 0)
                    self(idx, positions, mask, k, v, cols)
        except Exception as e:  # a compiler problem must never take the plain path down with it
            self.error = f"{type(e).__name__}: {e}"[:500]
            warnings.warn(f"picochat: compiling the decode step failed, decoding on the plain path: {self.error}")
        finally:
            self.done.set()


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DECODERS_LOCK = threading.Lock()


def decoder_for(model, fast: str = "auto") -> Optional[DecodeStep]:
    """The model's compiled decode step (one per model, shared by every engine on it: a new one per
    engine would compile again; a model changed since its step was made gets a new one), started in the
    background; None for the plain step.

    fast: "auto" compiles in the background when `unsupported(model)` finds nothing in the way, compiling
    pays (`slower_compiled`: not for fp32 models) and PICOCHAT_FAST (auto, compile or plain) does not say
    otherwise; "compile" insists (an error says why it cannot) and waits until the compiled step is
    ready; "plain" never compiles.
    """
    if fast not in FAST_CHOICES:
        raise PicochatError(f"unknown decode path {fast!r}; use one of: {', '.join(FAST_CHOICES)}")
    if fast == "auto":
        env = os.environ.get("PICOCHAT_FAST", "auto")
        if env not in FAST_CHOICES:
            raise PicochatError(f"PICOCHAT_FAST={env!r}: use one of {', '.join(FAST_CHOICES)}")
        fast = env
    if fast == "plain":
        return None
    reason = unsupported(model)
    if fast == "auto" and reason is None and slower_compiled(model):
        return None
    if reason:
        if fast == "compile":
            raise PicochatError(f"cannot compile this model's decode step: {reason}; use the plain path")
        return None
    with _DECODERS_LOCK:
        step = _DECODERS.get(model)
        if step is None or not step.fits(model):  # changed since: its graph no longer fits
            step = _DECODERS[model] = DecodeStep(model)
    return step.start(wait=fast == "compile")
