"""The peers' runners for benchmarks/decode.py: transformers' generate() and llama.cpp (llama-cpp-python), each
a function of (prompts, n_new) -> (seconds of the whole call, generated ids per row, seconds from the first new
token to the last), as decode.py's run_picochat."""
from __future__ import annotations

import time

import numpy as np
import torch


class _Stamps:
    """A transformers streamer that only notes when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def run_hf(model, prompts, new):
    idx = torch.tensor(prompts, dtype=torch.long)
    stamps = _Stamps()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, num_beams=1, streamer=stamps)
        dt = time.perf_counter() - t0
    return dt, out[:, idx.size(1):].tolist(), stamps.t[-1] - stamps.t[1]


class LlamaCpp:
    """llama.cpp as a runner (prompts, n_new) -> (seconds, ids per row, decode seconds), like run_picochat:
    llama-cpp-python's low-level API, one context per batch size with a sequence per row, greedy. The
    prompts go in llama_decode calls of up to n_batch tokens, rows packed together; then each step is one
    llama_decode of every row's last token (llama-server's continuous batching does the same). Each sequence
    has its own K/V cells (kv_unified off, which llama.cpp advises for sequences that share no prefix: on,
    8 rows x 512 tokens ran 1.35-1.42x batch 1 here, off 1.8x). flash_attn: llama.cpp's flash attention
    ("auto", its context default, or "on" / "off"; the high-level `Llama` that decode.py used until the
    eleventh session turns it off unless asked). Errors: RuntimeError."""

    N_BATCH = 512
    FLASH = {"auto": -1, "off": 0, "on": 1}  # LLAMA_FLASH_ATTN_TYPE_*

    def __init__(self, path: str, sizes: dict, new: int, threads: int = 2, flash_attn: str = "auto"):
        import llama_cpp
        self.api, self.threads, self.flash_attn = llama_cpp, threads, flash_attn
        if flash_attn not in self.FLASH:
            raise ValueError(f"flash_attn {flash_attn!r}: use auto, on or off")
        if max(sizes) > self.N_BATCH:
            raise ValueError(f"{max(sizes)} rows: one step's llama_decode takes at most {self.N_BATCH}")
        # the model only (its own context is unused); contexts are made below, one per batch size
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.ctxs = {}
        for rows, longest in sizes.items():
            p = llama_cpp.llama_context_default_params()
            per_seq = -(-(longest + new + 16) // 256) * 256  # (n_ctx must split evenly over the sequences)
            p.n_ctx, p.n_seq_max, p.kv_unified = rows * per_seq, rows, False
            p.n_batch = p.n_ubatch = self.N_BATCH
            p.n_threads = p.n_threads_batch = threads
            p.flash_attn_type = self.FLASH[flash_attn]
            ctx = llama_cpp.llama_init_from_model(self.llm.model, p)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {rows} rows x {per_seq} tokens")
            self.ctxs[rows] = ctx
        self.batch = llama_cpp.llama_batch_init(self.N_BATCH, 0, 1)

    def close(self):
        for ctx in self.ctxs.values():
            self.api.llama_free(ctx)
        self.api.llama_batch_free(self.batch)
        self.llm.close()

    def _decode(self, ctx, items) -> list:
        """items: (token, position, sequence, wants logits) -> the greedy next token of each that wants them."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (t, pos, s, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, int(want)
            b.seq_id[i][0] = s
        rc = self.api.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i, it in enumerate(items):
            if it[3]:
                ptr = self.api.llama_get_logits_ith(ctx, i)  # (i: the token's index in this batch)
                if not ptr:
                    raise RuntimeError(f"llama.cpp has no logits for the batch's token {i}")
                out.append(int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))))
        return out

    def __call__(self, prompts, new):
        ctx = self.ctxs[len(prompts)]
        self.api.llama_memory_clear(self.api.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        flat = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        first = []
        for c in range(0, len(flat), self.N_BATCH):
            first += self._decode(ctx, flat[c:c + self.N_BATCH])
        out = [[t] for t in first]  # (rows in order: each row's last prompt token comes after the row's others)
        stamps = [time.perf_counter()]
        for step in range(new - 1):
            nxt = self._decode(ctx, [(o[-1], len(p) + step, s, True) for s, (p, o) in enumerate(zip(prompts, out))])
            for o, t in zip(out, nxt):
                o.append(t)
            stamps.append(time.perf_counter())
        return stamps[-1] - t0, out, stamps[-1] - stamps[0]
