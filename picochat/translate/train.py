"""Train the translator (`picochat translate train`): teacher forcing on English -> French number words.

    loss = -1/|y| sum_t log p(y_t | y_<t, x)      x = English words, y = French words then EOS, padding ignored

The shared ``Trainer`` (train/loop.py) runs it: AdamW, warmup + cosine, clipping, metrics.jsonl, loss.png,
atomic checkpoints and exact resume. Batches are a pure function of the step (an epoch-seeded shuffle of the
training pairs). At every evaluation: the validation loss and greedy exact match on the validation numbers;
at the end: exact match on the held-out test numbers with greedy decoding and with beam search, in
results.json, and a cross-attention map of one held-out number, attention.png.

A checkpoint folder holds config.json ({"format": "picochat-seq2seq", "model": Seq2SeqConfig}),
model.safetensors and vocab.json (both vocabularies), plus the optimizer state while training.

    picochat translate train --out-dir runs/translate
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import PicochatError
from ..fsutil import atomic_dir, atomic_write
from ..model.seq2seq import Seq2Seq, Seq2SeqConfig, Seq2SeqShape
from ..train.loop import TrainConfig, Trainer
from .data import (PairTensors, Vocabs, build_vocabs, epoch_order, pairs_for, split_numbers, target_words,
                   unseen_words)

FORMAT, VERSION = "picochat-seq2seq", 1


@dataclass
class TranslateTrainConfig(Seq2SeqShape, TrainConfig):
    out_dir: str = "runs/translate"
    """Run directory: checkpoints (config.json, model.safetensors, vocab.json), metrics.jsonl, loss.png,
    results.json, attention.png."""
    max_number: int = 9999
    """Sentence pairs are the numbers 0..max_number."""
    test_fraction: float = 0.1
    """Numbers held out for the final exact-match test (never trained on)."""
    val_fraction: float = 0.05
    """Numbers held out for the validation loss and exact match during training."""
    split_seed: int = 0
    """Seed of the shuffle that splits the numbers (fixed, so every run holds out the same numbers)."""
    beam: int = 4
    """Beam width for the final held-out evaluation (greedy is always measured too)."""
    length_penalty: float = 1.0
    """Beam ranking: score / length^length_penalty (0 = summed log-probs, 1 = mean per token)."""
    max_steps: int = 600
    """Optimizer steps."""
    batch_size: int = 128
    """Sentence pairs per micro-batch."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps (post-norm transformers need them)."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only)."""
    beta2: float = 0.98
    """AdamW beta2 (the paper's)."""
    eval_every: int = 200
    """Validation loss and exact match every this many steps."""
    ckpt_every: int = 300
    """Write a checkpoint every this many steps (and at the end)."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default, one per core). On a machine shared with other work 1 can be
    faster: a 2-thread team waits at every op whenever another process holds one of the cores."""

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        Seq2SeqShape.__post_init__(self)  # widths, heads, layers: checked before any data is made
        split_numbers(self.max_number, self.test_fraction, self.val_fraction, self.split_seed)  # checks them
        from .evaluate import check_decoding
        check_decoding(self.beam, self.length_penalty)  # as `picochat translate`: a penalty needs --beam 2+
        if self.threads < 0:
            raise PicochatError(f"--threads must be >= 0 (0 = one per core), got {self.threads}")

    def model_config(self, src_vocab: int, tgt_vocab: int) -> Seq2SeqConfig:
        return Seq2SeqConfig(src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, **self.shape())


# ---- the checkpoint folder -------------------------------------------------------------------------------
def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor once (tied or shared embeddings are one tensor under several
    names; safetensors stores each storage once)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().contiguous().cpu()
    return out


def save_translator(model: Seq2Seq, vocabs: Vocabs, out_dir, extra_files: Optional[dict] = None) -> Path:
    """config.json + model.safetensors + vocab.json (+ extra files), written as one atomic directory."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "model": model.config.to_dict()}, indent=2))
        save_file(_unique_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "vocab.json").write_text(vocabs.to_json(), encoding="utf-8")
    return atomic_dir(out_dir, fill, extra_files)


def read_translator_config(ckpt: Path) -> Seq2SeqConfig:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"{ckpt}/config.json is unreadable ({e}); use another checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PicochatError(f"{ckpt} is not a translator checkpoint (its config.json is not a seq2seq model's); "
                            "train one with `picochat translate train --out-dir DIR`")
    if meta.get("version", 0) > VERSION:
        raise PicochatError(f"{ckpt} was written by a newer picochat (format v{meta['version']}); upgrade picochat")
    return Seq2SeqConfig.from_dict(meta["model"])


def load_weights(model: Seq2Seq, ckpt: Path) -> None:
    """Strict load, except for the names of shared tensors (saved once, under their first name)."""
    from ..checkpoints.io import load_state
    state = load_state(ckpt / "model.safetensors")
    expected = _unique_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise PicochatError(f"{ckpt} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                            f"wrong shape {bad[:3]}; the checkpoint is damaged or from another picochat")
    model.load_state_dict(state, strict=False)  # the aliases of shared tensors are filled by their first name


def resolve_translator(path) -> Path:
    from ..checkpoints.io import resolve_checkpoint
    path = Path(path)
    if not path.exists():
        raise PicochatError(f"no translator at {path}: train one with `picochat translate train --out-dir {path}`")
    if not (path.is_dir() and ((path / "latest").is_file() or (path / "config.json").is_file())):
        raise PicochatError(f"{path} is not a translator (no config.json, no `latest` file): pass the run directory "
                            "of `picochat translate train` or one of its checkpoint folders")
    ckpt = resolve_checkpoint(path)
    read_translator_config(ckpt)
    return ckpt


def load_translator(path, device: str = "cpu") -> tuple[Seq2Seq, Vocabs, Path]:
    """A run directory (follows `latest`) or a checkpoint folder -> (Seq2Seq in eval mode, Vocabs, folder)."""
    ckpt = resolve_translator(path)
    model = Seq2Seq(read_translator_config(ckpt))
    load_weights(model, ckpt)
    try:
        vocabs = Vocabs.from_json((ckpt / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise PicochatError(f"{ckpt}/vocab.json is missing or corrupt ({e}); use another checkpoint")
    c = model.config
    if (len(vocabs.source), len(vocabs.target)) != (c.src_vocab_size, c.tgt_vocab_size):
        raise PicochatError(f"{ckpt}/vocab.json has {len(vocabs.source)}/{len(vocabs.target)} words but the model "
                            f"{c.src_vocab_size}/{c.tgt_vocab_size}; the checkpoint is damaged")
    return model.to(device).eval(), vocabs, ckpt


# ---- training ---------------------------------------------------------------------------------------------
def check_held_out(cfg: TranslateTrainConfig, vocabs: Vocabs, held_out: list[tuple[str, str]]) -> None:
    """Refuse, before any training step, a beam the target vocabulary cannot fill and held-out (validation or
    test) numbers whose words training never sees: both would only fail at the evaluations."""
    widest = len(vocabs.target) - 2  # beam search's first step extends BOS by every token but PAD and BOS
    if cfg.beam > widest:
        raise PicochatError(f"--beam {cfg.beam} is wider than the target vocabulary allows (its {widest - 1} "
                            f"words and EOS): give --beam {widest} or less")
    unseen = unseen_words(held_out, vocabs)
    if unseen:
        raise PicochatError(f"the held-out numbers use words training never sees ({', '.join(unseen)}): "
                            "raise --max-number or change --split-seed")


def translate_train(cfg: TranslateTrainConfig) -> dict:
    """Train, then measure held-out exact match (greedy and beam); returns (and writes) results.json's dict."""
    from .evaluate import exact_match, plot_cross_attention
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = split_numbers(cfg.max_number, cfg.test_fraction, cfg.val_fraction, cfg.split_seed)
    train_pairs, val_pairs, test_pairs = (pairs_for(split[k]) for k in ("train", "val", "test"))
    vocabs = build_vocabs(train_pairs, cfg.shared_vocab)
    check_held_out(cfg, vocabs, val_pairs + test_pairs)  # what would only fail after training, refused now
    train, val, test = (PairTensors(p, vocabs) for p in (train_pairs, val_pairs, test_pairs))
    longest = max(t.size(1) for d in (train, val, test) for t in (d.src, d.tgt))
    if longest > cfg.block_size:
        raise PicochatError(f"--block-size {cfg.block_size} is shorter than the longest sentence ({longest} tokens "
                            "with BOS/EOS); give at least that")
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(cfg.model_config(len(vocabs.source), len(vocabs.target)))
    B = cfg.batch_size
    box: list[Trainer] = []

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> list[int]:
        return epoch_order(len(train), epoch, cfg.seed)

    def batch_fn(step: int, micro: int):  # pair i of the run is pair i % N of epoch i // N's shuffle
        first = (step * cfg.grad_accum + micro) * B
        return train.batch([order(i // len(train))[i % len(train)] for i in range(first, first + B)])

    def loss_fn(m, batch):
        return m(*batch)[1]

    def eval_fn(m):
        device = next(m.parameters()).device
        losses = [(len(idx), float(m(*(t.to(device) for t in val.batch(idx)))[1]))
                  for idx in (list(range(s, min(s + 256, len(val)))) for s in range(0, len(val), 256))]
        out = {"val_loss": sum(n * x for n, x in losses) / max(1, sum(n for n, _ in losses))} if losses else {}
        if len(val):
            out["val_exact_match"] = exact_match(m, vocabs, val.pairs, beam=1)["exact_match"]
        return out

    def save_weights(path, extra_files):
        save_translator(box[0].raw_model, vocabs, path, extra_files)

    def load(ckpt: Path):
        if read_translator_config(ckpt).to_dict() != model.config.to_dict():
            raise PicochatError(f"cannot resume: {ckpt} was trained with another model; use the same options "
                                "or a new --out-dir")
        if (ckpt / "vocab.json").read_text(encoding="utf-8") != vocabs.to_json():
            raise PicochatError(f"cannot resume: {ckpt} was trained on other data (another split or vocabulary)")
        load_weights(box[0].raw_model, ckpt)

    run_info = {"stage": "translate", "split": {k: len(v) for k, v in split.items()},
                "src_vocab": len(vocabs.source), "tgt_vocab": len(vocabs.target), "params": model.num_params()}
    trainer = Trainer(cfg, model, batch_fn, loss_fn, eval_fn=eval_fn, run_info=run_info,
                      save_weights=save_weights, load_weights=load)
    box.append(trainer)
    if trainer.dist.world > 1:
        raise PicochatError("the translator trains in one process (it takes minutes); run it without torchrun")
    if trainer.dist.is_main and cfg.progress:
        print(f"translator: {model.num_params():,} parameters, {len(train)} training pairs, "
              f"{len(val)} validation and {len(split['test'])} test numbers held out")
    rows = trainer.fit()
    train_s = time.perf_counter() - t0
    model = trainer.raw_model.eval()
    greedy = exact_match(model, vocabs, test_pairs, beam=1)
    beam = exact_match(model, vocabs, test_pairs, beam=cfg.beam, length_penalty=cfg.length_penalty)
    example = max(test_pairs, key=lambda p: len(target_words(p[1])))[0]  # the longest French: the richest map
    plot_cross_attention(model, vocabs, example, Path(cfg.out_dir) / "attention.png")
    last = [r for r in rows if "val_loss" in r]
    results = {"test_numbers": len(test_pairs), "greedy_exact_match": greedy["exact_match"],
               f"beam{cfg.beam}_exact_match": beam["exact_match"], "length_penalty": cfg.length_penalty,
               "greedy_errors": greedy["errors"][:10], "beam_errors": beam["errors"][:10],
               "val_loss": last[-1]["val_loss"] if last else None,
               "final_train_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
               "steps": cfg.max_steps, "params": model.num_params(), "train_seconds": round(train_s, 1),
               "eval_seconds": round(time.perf_counter() - t0 - train_s, 1)}
    atomic_write(Path(cfg.out_dir) / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    return results
