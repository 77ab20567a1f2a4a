"""`picochat bert TASK`: a small BERT from scratch on the Brown corpus, on the shared Trainer.

    picochat bert mlm   --out-dir runs/bert-mlm                         masked-LM pretraining
    picochat bert pos   --init runs/bert-mlm --out-dir runs/bert-pos    12-tag universal POS tagging
    picochat bert genre --init runs/bert-mlm --out-dir runs/bert-genre  press / general / learned / fiction

Documents are split once (data.brown_tags.split_documents, seed 0): every task trains on the same
training documents and never sees the validation or test ones (masked-LM pretraining included). At
the end the model is scored on the test documents beside a baseline computed in the same run
(most-frequent tag; TF-IDF + logistic regression), into results.json.

Checkpoints are written in transformers' BERT format (config.json, model.safetensors, tokenizer.json):
`picochat tag`, `classify`, `embed` and `serve` read them, and so does transformers' BertFor*.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..errors import PicochatError
from . import bert_data as D

TASKS = ("mlm", "pos", "genre")


@dataclass
class BertTrainConfig:
    task: Literal["mlm", "pos", "genre"] = "mlm"
    """mlm (masked-LM pretraining), pos (part-of-speech tagging) or genre (passage classification)."""
    out_dir: str = "runs/bert-mlm"
    """Run directory: checkpoints, metrics.jsonl, loss.png, results.json."""
    init: Optional[str] = None
    """A `picochat bert` run (or checkpoint) to start from: its tokenizer and encoder (usually an mlm run;
    a pos run's encoder also knows syntax)."""
    n_layer: int = 4
    """Transformer blocks (a new model; with --init the saved model's shape is used)."""
    positions: Literal["rope", "learned"] = "rope"
    """rope (as ModernBERT: a tagger finds its neighbours from the first steps; tagging from scratch reached
    96.4% on validation in 300 steps, learned positions 91.3% in 400) or learned (as BERT: the checkpoint
    also loads in transformers)."""
    n_head: int = 4
    """Attention heads."""
    n_embd: int = 256
    """Hidden size d."""
    vocab_size: int = 8000
    """WordPiece vocabulary learned from the training documents (a new model only)."""
    max_len: int = 128
    """Tokens per row ([CLS] and [SEP] included); a sentence longer than a row is cut between words into
    rows. A new model's position table is this long (an mlm run for genre passages wants 256); a genre
    passage longer than this leaves every split and the baseline (counted in results.json)."""
    passage_words: int = 100
    """genre: words per passage (passages end on sentence boundaries)."""
    passage_shifts: int = 1
    """genre: cut each training document this many times, each cut starting one more sentence in, so
    training sees passages that begin at other places (evaluation keeps the one cut the baseline sees)."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (0: these small runs underfit, never overfit)."""
    max_steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 32
    """Rows per step."""
    lr: float = 1e-3
    """Peak learning rate (warmup, then cosine to a tenth)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    eval_every: int = 250
    """Validation every this many steps (masked-token or label accuracy on validation documents)."""
    dtype: str = "auto"
    """auto (bf16 where fast), fp32 or bf16."""
    seed: int = 1337
    """Seed for initialisation, data order and masking."""
    resume: bool = False
    """Continue from the latest checkpoint in out_dir."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise PicochatError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "mlm" and self.init:
            raise PicochatError("--init is for fine-tuning (pos, genre) from an mlm run")
        if not 8 <= self.max_len <= 512:
            raise PicochatError(f"--max-len must be in [8, 512], got {self.max_len}")
        if self.n_embd % self.n_head or self.n_layer < 1:
            raise PicochatError(f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head}, and --n-layer >= 1")
        shaped = [n for n in ("n_layer", "n_head", "n_embd", "vocab_size", "positions")
                  if getattr(self, n) != getattr(BertTrainConfig, n)]
        if self.init and shaped:
            raise PicochatError(f"--{shaped[0].replace('_', '-')} shapes a new model; with --init the model "
                                f"(and its vocabulary) come from {self.init}")
        for name in ("passage_words", "passage_shifts"):
            if getattr(self, name) != getattr(BertTrainConfig, name) and self.task != "genre":
                raise PicochatError(f"--{name.replace('_', '-')} is for the genre task")
        if self.passage_shifts < 1:
            raise PicochatError(f"--passage-shifts must be at least 1, got {self.passage_shifts}")
        if self.vocab_size < 100:
            raise PicochatError(f"--vocab-size {self.vocab_size} is too small for WordPiece; try 8000")


def load_bert_run(path) -> tuple[object, object, dict]:
    """(BertForTask in eval mode, tokenizers.Tokenizer, its config.json) from a run or checkpoint folder."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from ..checkpoints.io import resolve_checkpoint
    from ..model.bert import bert_task_from_state
    ckpt = resolve_checkpoint(path)
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    if hf_cfg.get("model_type") not in ("bert", "picochat_bert"):
        raise PicochatError(f"{path} is not a BERT checkpoint (config.json model_type is "
                            f"{hf_cfg.get('model_type', hf_cfg.get('format'))!r}); train one with `picochat bert`")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    if [tok.token_to_id(t) for t in D.SPECIALS] != list(range(len(D.SPECIALS))):
        raise PicochatError(f"{path} is a BERT model but not a `picochat bert` run (its special tokens are not "
                            f"{', '.join(D.SPECIALS)} = 0..4); train one with `picochat bert`")
    model = bert_task_from_state(hf_cfg, load_file(str(ckpt / "model.safetensors")))
    return model.eval(), tok, hf_cfg


def _data(cfg: BertTrainConfig, tok, dropped: Optional[dict] = None):
    """(train rows, val rows, test rows, labels): rows are (ids, labels) for pos, (ids, label, text) for
    genre, ids for mlm. dropped: filled with the genre passages per split too long to read."""
    dropped = {} if dropped is None else dropped
    from ..data.brown_tags import GENRE_GROUPS, UNIVERSAL_TAGS, load_tagged, passages, split_documents
    splits = split_documents(load_tagged())
    if cfg.task == "mlm":
        return [D.text_rows(tok, ([w for w, _ in s] for d in docs for s in d["sentences"]), cfg.max_len)
                for docs in splits] + [()]
    if cfg.task == "pos":
        index = {t: i for i, t in enumerate(UNIVERSAL_TAGS)}
        return [[r for d in docs for r in D.tagged_rows(tok, d["sentences"], index, cfg.max_len)]
                for docs in splits] + [UNIVERSAL_TAGS]
    groups = tuple(sorted(set(GENRE_GROUPS.values())))
    out = []
    for k, docs in enumerate(splits):
        shifts = range(cfg.passage_shifts if k == 0 else 1)  # (the training split only)
        texts = [(p, groups.index(GENRE_GROUPS[d["genre"]])) for d in docs for shift in shifts
                 for p in passages(d | {"sentences": d["sentences"][shift:]}, cfg.passage_words)]
        enc = tok.encode_batch([t for t, _ in texts])
        # a passage longer than the model reads (a table of figures: ~1 in 4,000 at 256 tokens) leaves every
        # split, the baseline's too, rather than be judged on its beginning alone; results.json counts them
        dropped[("train", "val", "test")[k]] = sum(len(e.ids) > cfg.max_len for e in enc)
        if dropped[("train", "val", "test")[k]] > 0.05 * len(enc):
            raise PicochatError(f"{dropped[('train', 'val', 'test')[k]]} of {len(enc)} passages of {cfg.passage_words} "
                                f"words are longer than --max-len {cfg.max_len} tokens: raise --max-len (the --init "
                                "model reads at most its own) or lower --passage-words")
        out.append([(e.ids, y, t) for e, (t, y) in zip(enc, texts) if len(e.ids) <= cfg.max_len])
    return out + [groups]


def make_batch(task: str, pick: list, vocab_size: int, gen: torch.Generator):
    """(inputs, attention mask, targets) of some rows: mlm corrupts them with BERT's masking (targets -100
    except at the chosen tokens), pos pads the tags with -100, genre has one label per row."""
    if task == "mlm":
        ids = D.pad(pick, D.PAD)
        inputs, y = D.mask_tokens(ids, vocab_size, gen)
        return inputs, (ids != D.PAD).long(), y
    ids = D.pad([r[0] for r in pick], D.PAD)
    y = D.pad([r[1] for r in pick], D.IGNORE) if task == "pos" else torch.tensor([r[1] for r in pick])
    return ids, (ids != D.PAD).long(), y


def _batch(cfg, rows, batches: D.Batches, vocab_size: int):
    def batch_fn(step: int, micro: int):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)  # (mlm's masking)
        return make_batch(cfg.task, [rows[i] for i in batches.indices(step, micro)], vocab_size, g)
    return batch_fn


def scored(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) where the loss is: the per-token heads run on the labelled positions only."""
    ids, mask, y = batch
    select = (y != D.IGNORE) if y.dim() == 2 else None
    logits = model(ids, mask, select=select).float()  # (N, V) / (N, L) at selected positions, or (B, L)
    return logits, (y[select] if select is not None else y)


def loss_fn(model, batch):
    logits, target = scored(model, batch)
    return F.cross_entropy(logits, target), {"accuracy": (logits.argmax(-1) == target).float().mean().item()}


@torch.no_grad()
def accuracy(model, rows, task: str, vocab_size: int, batch_size: int = 64, seed: int = 0) -> dict:
    """Masked-token (mlm) or label accuracy over rows, plus mean loss; mlm masks with a fixed seed."""
    model.eval()
    right = total = 0
    loss_sum = 0.0
    g = torch.Generator().manual_seed(seed)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i] if task == "mlm" else rows[i][0]))
    for s in range(0, len(order), batch_size):
        logits, target = scored(model, make_batch(task, [rows[i] for i in order[s:s + batch_size]], vocab_size, g))
        right += int((logits.argmax(-1) == target).sum())
        total += target.numel()
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    return {"accuracy": right / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}


def _new_config(cfg: BertTrainConfig, vocab_size: int):
    from ..model.config import ModelConfig
    return ModelConfig(vocab_size=vocab_size, block_size=cfg.max_len, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, ffn_hidden=4 * cfg.n_embd, pos=cfg.positions,
                       norm="layernorm", norm_eps=1e-12, norm_position="post", activation="gelu", bias=True,
                       tie_embeddings=False, dropout=cfg.dropout)


def _writers(model, tok, cfg: BertTrainConfig):
    """Checkpoints in transformers' BERT format (plus our run facts under "picochat" in config.json)."""
    from safetensors.torch import load_file, save_file
    from ..fsutil import atomic_dir
    from ..model.bert import config_to_bert, state_to_bert

    def save_weights(out_dir: Path, extra_files: dict) -> None:
        def fill(tmp: Path) -> None:
            hf = config_to_bert(model.config, model.task, model.labels) | {
                "picochat": {"task": cfg.task, "max_len": cfg.max_len, "passage_words": cfg.passage_words}}
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            save_file(state_to_bert(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save(str(tmp / "tokenizer.json"))
        atomic_dir(out_dir, fill, extra_files)

    def load_weights(ckpt: Path) -> None:
        from ..model.bert import bert_task_from_state
        saved = bert_task_from_state(json.loads((ckpt / "config.json").read_text()),
                                     load_file(str(ckpt / "model.safetensors")))
        if saved.config.to_dict() != model.config.to_dict() or saved.labels != model.labels:
            raise PicochatError(f"cannot resume: {ckpt} holds another model shape or label set; use a new --out-dir")
        model.load_state_dict(saved.state_dict())
    return {"save_weights": save_weights, "load_weights": load_weights}


def _tokenizer_and_model(cfg: BertTrainConfig, labels: tuple[str, ...], train_docs):
    from ..checkpoints.io import CheckpointManager
    from ..model.bert import BertForTask
    from tokenizers import Tokenizer
    task = {"mlm": "mlm", "pos": "token", "genre": "sequence"}[cfg.task]
    latest = CheckpointManager(cfg.out_dir).latest() if cfg.resume else None
    mine = Tokenizer.from_file(str(latest / "tokenizer.json")) if latest is not None else None
    torch.manual_seed(cfg.seed)  # the head's initialisation: this run's seed, whatever ran before in the process
    if cfg.init:
        base, tok, _ = load_bert_run(cfg.init)
        if cfg.max_len > base.config.block_size:
            raise PicochatError(f"--max-len {cfg.max_len} is more than {cfg.init} reads ({base.config.block_size} "
                                "positions); lower it, or pretrain with a larger --max-len")
        if mine is not None and mine.to_str() != tok.to_str():
            raise PicochatError(f"cannot resume: {latest} was trained with another vocabulary than {cfg.init} has "
                                "now; resume with the --init it started from, or use a new --out-dir")
        model = BertForTask(dataclasses.replace(base.config, dropout=cfg.dropout), task, labels)
        model.encoder.load_state_dict(base.encoder.state_dict())
        return tok, model
    # resuming: the vocabulary the run started with (WordPiece training is not bit-stable across versions)
    tok = mine or D.train_wordpiece((" ".join(w for w, _ in s) for d in train_docs for s in d["sentences"]),
                                    cfg.vocab_size)
    return tok, BertForTask(_new_config(cfg, tok.get_vocab_size()), task, labels)


def _baseline(cfg: BertTrainConfig, train_docs, test_docs, train_rows, test_rows) -> dict:
    from ..data.brown_tags import most_frequent_tag_baseline, tfidf_genre_baseline
    if cfg.task == "pos":
        return {"name": "most-frequent tag", "accuracy": most_frequent_tag_baseline(train_docs, test_docs)}
    if cfg.task == "genre":  # the very passages the encoder trains on and is scored on
        return {"name": "TF-IDF + logistic regression", "accuracy": tfidf_genre_baseline(
            [(t, y) for _, y, t in train_rows], [(t, y) for _, y, t in test_rows])}
    counts = torch.bincount(torch.tensor([t for r in train_rows for t in r[1:-1]]))
    top = int(counts.argmax())  # always guess the commonest training token (",", "the", ...)
    g = torch.Generator().manual_seed(0)
    targets = torch.cat([D.mask_tokens(D.pad(test_rows[s:s + 64], D.PAD), len(counts), g)[1].flatten()
                         for s in range(0, len(test_rows), 64)])
    targets = targets[targets != D.IGNORE]
    return {"name": "commonest token", "accuracy": float((targets == top).float().mean())}


def train_bert(cfg: BertTrainConfig) -> dict:
    """The plain-Python form of `picochat bert`: trains, scores the test documents, writes results.json."""
    from ..data.brown_tags import load_tagged, split_documents
    from ..fsutil import atomic_write
    from .loop import TrainConfig, Trainer
    t0 = time.time()
    train_docs, val_docs, test_docs = split_documents(load_tagged())
    from ..data.brown_tags import GENRE_GROUPS, UNIVERSAL_TAGS
    labels = {"mlm": (), "pos": UNIVERSAL_TAGS, "genre": tuple(sorted(set(GENRE_GROUPS.values())))}[cfg.task]
    tok, model = _tokenizer_and_model(cfg, labels, train_docs)
    dropped: dict = {}
    train_rows, val_rows, test_rows, _ = _data(cfg, tok, dropped)
    V = model.config.vocab_size
    tcfg = TrainConfig(out_dir=cfg.out_dir, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, beta2=0.999,
                       eval_every=cfg.eval_every, ckpt_every=max(cfg.eval_every, 500), log_every=10,
                       dtype=cfg.dtype, seed=cfg.seed, resume=cfg.resume, progress=cfg.progress)
    batches = D.Batches(len(train_rows), cfg.batch_size, 1, cfg.seed)  # (one process, no accumulation)
    val_probe = val_rows[:2000] if cfg.task != "genre" else val_rows

    def eval_fn(m):
        out = accuracy(m, val_probe, cfg.task, V)
        return {"val_accuracy": out["accuracy"], "val_loss": out["loss"]}
    trainer = Trainer(tcfg, model, _batch(cfg, train_rows, batches, V), loss_fn, eval_fn,
                      run_info={"bert": asdict(cfg)}, **_writers(model, tok, cfg))
    if trainer.dist.world > 1:
        raise PicochatError("picochat bert runs in one process; start it without torchrun")
    torch.manual_seed(cfg.seed)
    trainer.fit()
    train_s = time.time() - t0
    test = accuracy(model, test_rows, cfg.task, V)
    results = {"task": cfg.task, "test_accuracy": round(test["accuracy"], 4), "test_n": test["n"],
               "baseline": {k: round(v, 4) if isinstance(v, float) else v for k, v in
                            _baseline(cfg, train_docs, test_docs, train_rows, test_rows).items()},
               "documents": {"train": len(train_docs), "val": len(val_docs), "test": len(test_docs)},
               "train_rows": len(train_rows), "steps": cfg.max_steps, "train_seconds": round(train_s, 1),
               "init": cfg.init} | ({"passages_too_long_dropped": dropped} if cfg.task == "genre" else {})
    atomic_write(Path(cfg.out_dir) / "results.json", json.dumps(results, indent=2))
    print(json.dumps(results), flush=True)
    return results


def add_parser(sub) -> None:
    import argparse
    from ..cli_args import add_dataclass_args, dataclass_from_args
    p = sub.add_parser("bert", help="a small BERT from scratch on Brown: masked-LM, POS tagging, genres",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, BertTrainConfig, positional=("task",))
    p.set_defaults(func=lambda args: train_bert(dataclass_from_args(BertTrainConfig, args)) and 0)
