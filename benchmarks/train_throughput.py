"""Training throughput: picochat vs transformers' GPT2LMHeadModel, same shape, same batch, same run.

Both models get the same GPT-2-style shape (learned positions, LayerNorm with bias, tanh-GELU, tied
embeddings, pre-norm), the same weights (picochat's init copied into the HF model, checked by comparing
logits), the same random token batch and the same optimizer (picochat's make_optimizer: fused AdamW,
decay on matrices), plus grad-norm clipping as both picochat's Trainer and HF's Trainer do. A timed step
is a full training step: forward + loss + backward + clip + optimizer step + zero_grad + loss.item().

Steps are interleaved (ours, HF, HF, ours, ...: the order flips every round) so load from other
processes hits both alike; the figure is the median step time, and the ratio is also given as the
median of per-round ratios. MFU = tokens/s x training FLOPs per token / the matmul peak of that dtype,
measured in this run before and after the timed steps (best of both): a big square GEMM, best of a few
reps, through torch.matmul and, for fp32, also straight through oneDNN (MKL, behind torch.matmul, takes
its AVX2 path on AMD CPUs; oneDNN uses AVX-512), and the faster kernel is the peak. FLOPs per token are
picochat's ModelConfig.flops_per_token(): 6N (non-embedding matrices + LM head) + 12 L T d, for both.

    python benchmarks/train_throughput.py                     # ~2 min, one JSON line on stdout
    python benchmarks/train_throughput.py --dtypes bf16 --compile        # both models compiled
    PYTHONPATH=/path/to/patched/checkout python benchmarks/train_throughput.py   # benchmark a change
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import transformers
from _common import (
    parse_dtypes,
    DTYPES,
    emit,
    loadavg,
    log,
    machine,
    matmul_peak,
    median,
    tune_malloc,
)

from picochat.checkpoints.hf import state_dict_to_hf
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.train.optim import make_optimizer
from picochat.train.pretrain import lm_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=12, help="timed steps per model and dtype")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model and dtype first")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--compile", nargs="?", const="both", default="none", choices=["none", "both", "picochat"],
                   help="torch.compile both models (--compile), or only picochat (--compile picochat: the "
                        "picochat Trainer's --compile against HF as HF users run it)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 = no clipping")
    p.add_argument("--hf-act", default="gelu_pytorch_tanh",
                   help="HF activation_function: gelu_pytorch_tanh (torch's C tanh-GELU, HF's fastest) or "
                        "gelu_new (GPT-2 checkpoints' default, the same maths in Python ops)")
    p.add_argument("--peak-size", type=int, default=4096, help="n of the n x n matmul that measures the peak")
    p.add_argument("--tune-malloc", action="store_true",
                   help="mallopt: no mmap/munmap per big tensor (process-wide, so it speeds up both models)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtypes = parse_dtypes(p, args.dtypes)
    return args


def build_models(args) -> tuple[ModelConfig, torch.nn.Module, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    cfg = ModelConfig(vocab_size=args.vocab, block_size=args.ctx, n_layer=args.layers, n_head=args.heads,
                      n_embd=args.dim, pos="learned", norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
                      bias=True, tie_embeddings=True, dropout=0.0)
    torch.manual_seed(args.seed)
    ours = GPT(cfg)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ffn_hidden,
                        activation_function=args.hf_act, layer_norm_epsilon=cfg.norm_eps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        use_cache=False, bos_token_id=None, eos_token_id=None)
    hf_cfg._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg, "gpt2"), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise SystemExit(f"weight copy into the HF model failed: missing {missing}, unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise SystemExit("HF lm_head is not tied to wte")
    if hf.config._attn_implementation != "sdpa":
        raise SystemExit(f"HF attention is {hf.config._attn_implementation!r}, expected 'sdpa'")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise SystemExit(f"parameter counts differ: picochat {n_ours:,}, HF {n_hf:,}")
    return cfg, ours, hf


def check_same_maths(ours, hf, x) -> float:
    """Max |logit difference| between the two models on the benchmark batch (fp32, eval)."""
    ours.eval(), hf.eval()
    with torch.no_grad():
        a = ours(x[:2])[0]
        b = hf(input_ids=x[:2]).logits
    ours.train(), hf.train()
    return (a - b).abs().max().item()


def make_step(model, opt, kind: str, x, y, amp_dtype, grad_clip: float):
    """One full training step; returns the loss as a float (the .item() a training loop does)."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def step() -> float:
        ctx = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype != torch.float32 else contextlib.nullcontext()
        with ctx:
            if kind == "picochat":  # what picochat's pretraining stage hands the Trainer
                loss = lm_loss(model, (x, y))
            else:  # what a HF user writes: labels = the inputs, the model shifts them itself
                loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    log(f"train_throughput: load {loadavg()} on {machine()['cpus']} cpus, torch threads {torch.get_num_threads()}")

    malloc_tuned = tune_malloc() if args.tune_malloc else False
    if args.tune_malloc:
        log(f"mallopt tuning {'applied' if malloc_tuned else 'FAILED'} (process-wide: both models get it)")
    peak_detail = matmul_peak(args.dtypes, args.peak_size)
    log("matmul " + ", ".join(f"{k} {v:,.0f}" for k, v in peak_detail.items()) + f" GFLOP/s ({args.peak_size}^2)")

    cfg, ours, hf = build_models(args)
    B, T = args.batch, args.ctx
    g = torch.Generator().manual_seed(args.seed)
    tok = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    diff = check_same_maths(ours, hf, x)
    log(f"shape {cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d ctx {T} batch {B} vocab {cfg.vocab_size}: "
        f"{ours.num_params():,} params; max |logit diff| picochat vs HF {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"picochat and HF disagree on the same weights (max |logit diff| {diff:.3g}); "
                         "the comparison would not be like for like")

    fpt = cfg.flops_per_token(T)
    tokens = B * T
    models = {"picochat": ours, "hf": hf}
    opts = {k: make_optimizer(m, args.lr, 0.1, (0.9, 0.95), "cpu") for k, m in models.items()}
    runners = {k: (torch.compile(m) if args.compile in ("both", k) else m) for k, m in models.items()}

    result = {"benchmark": "train_throughput",
              "shape": {"layers": cfg.n_layer, "heads": cfg.n_head, "dim": cfg.n_embd, "ctx": T, "batch": B,
                        "vocab": cfg.vocab_size, "params": ours.num_params(), "flops_per_token": fpt},
              "compile": args.compile, "hf_attn": "sdpa", "hf_activation": args.hf_act,
              "peer": f"transformers {transformers.__version__} GPT2LMHeadModel",
              "malloc": "tuned" if malloc_tuned else "glibc default"}
    t_start = time.perf_counter()
    timings = {}
    for d in args.dtypes:
        steps = {k: make_step(runners[k], opts[k], k, x, y, DTYPES[d], args.grad_clip) for k in models}
        t0 = time.perf_counter()
        for k in models:
            for _ in range(args.warmup):
                steps[k]()
        log(f"{d}: warmup {args.warmup} steps each in {time.perf_counter() - t0:.1f}s, load {loadavg()}")
        times = timings[d] = {k: [] for k in models}
        order = list(models)
        for r in range(args.steps):
            for k in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                t0 = time.perf_counter()
                loss = steps[k]()
                times[k].append(time.perf_counter() - t0)
            log(f"  {d} round {r + 1}/{args.steps}: picochat {times['picochat'][-1] * 1e3:.0f} ms, "
                f"hf {times['hf'][-1] * 1e3:.0f} ms (loss {loss:.3f}), load {loadavg()}")

    # the peak once more after the runs; the better of the two is the least disturbed by other load
    for k, v in matmul_peak(args.dtypes, args.peak_size).items():
        peak_detail[k] = max(peak_detail[k], v)
    peaks = {d: max(v for k, v in peak_detail.items() if k.startswith(d)) for d in args.dtypes}
    result["peak_gflops"] = {d: round(v, 1) for d, v in peaks.items()}
    result["peak_detail_gflops"] = {k: round(v, 1) for k, v in peak_detail.items()}
    for d, times in timings.items():
        med = {k: median(v) for k, v in times.items()}
        tps = {k: tokens / v for k, v in med.items()}
        paired = median([h / o for o, h in zip(times["picochat"], times["hf"])])
        result[d] = {"picochat_tok_s": round(tps["picochat"], 1), "hf_tok_s": round(tps["hf"], 1),
                     "ratio": round(tps["picochat"] / tps["hf"], 3), "ratio_paired": round(paired, 3),
                     "picochat_mfu": round(tps["picochat"] * fpt / (peaks[d] * 1e9), 4),
                     "hf_mfu": round(tps["hf"] * fpt / (peaks[d] * 1e9), 4),
                     "picochat_step_ms": round(med["picochat"] * 1e3, 1), "hf_step_ms": round(med["hf"] * 1e3, 1)}
        log(f"{d}: picochat {tps['picochat']:,.0f} tok/s, hf {tps['hf']:,.0f} tok/s, "
            f"ratio {result[d]['ratio']:.3f} (paired {paired:.3f}), "
            f"MFU {result[d]['picochat_mfu']:.1%} vs {result[d]['hf_mfu']:.1%} of {peaks[d]:,.0f} GFLOP/s")
    result |= machine() | {"load_avg_1m": loadavg(), "seconds": round(time.perf_counter() - t_start, 1)}
    emit(result)


if __name__ == "__main__":
    main()
