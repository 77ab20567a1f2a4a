"""Pretraining: next-token prediction on token shards, with the shared training loop.

    loss = -1/N sum_t log p(x_{t+1} | x_{<=t})      (cross-entropy of the next token)

`picochat pretrain [DATA] --preset tiny` trains on the embedded Brown corpus when DATA is omitted.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from ..model.config import ModelConfig, PRESETS, preset
from .loop import TrainConfig, Trainer

# Training recipes per preset: the model shape lives in model/config.py, the schedule here.
# "tiny" is tuned to learn as much as it can in about 10 minutes on a 2-core CPU (README has the curve).
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(max_steps=1200, batch_size=16, grad_accum=1, lr=3e-3, warmup_steps=50, eval_every=100,
                 ckpt_every=200, weight_decay=0.1),
    "small": dict(max_steps=4000, batch_size=16, grad_accum=2, lr=2e-3, warmup_steps=100, eval_every=250,
                  ckpt_every=500),
    "gpt2": dict(max_steps=20000, batch_size=8, grad_accum=8, lr=6e-4, warmup_steps=700, eval_every=500,
                 ckpt_every=1000),
}


class TokenWindows:
    """Fixed-length windows of a flat token file, visited in a fresh seeded order every epoch.

    Window w of epoch e starts at shift(e) + w*T: the shift moves the boundaries between epochs, so a
    multi-epoch run does not see the exact same sequences again. Sample i of the run is a pure function
    of (seed, i), which is what makes resume and multi-process runs exact without loader state.
    """

    def __init__(self, path: Path, dtype: str, seq_len: int, seed: int):
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.T, self.seed = seq_len, seed
        self.n_windows = (len(self.data) - 1 - seq_len) // seq_len
        if self.n_windows < 1:
            raise PicochatError(f"{path} has {len(self.data)} tokens, too few for even two windows of "
                                f"{seq_len}; use more text or a smaller --block-size")
        self._perm_epoch, self._perm = -1, None

    def _window(self, sample: int) -> np.ndarray:
        epoch, i = divmod(sample, self.n_windows)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g).numpy(), epoch
        shift = (epoch * 7919) % self.T
        start = shift + int(self._perm[i]) * self.T
        return self.data[start:start + self.T + 1]

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self._window(first_sample + b) for b in range(batch_size)])
                                .astype(np.int64))
        return rows[:, :-1], rows[:, 1:]  # inputs x_t, targets x_{t+1}: (B, T) each

    def sequential(self, max_windows: int) -> list[np.ndarray]:
        n = min(max_windows, (len(self.data) - 1) // self.T)
        return [self.data[i * self.T:i * self.T + self.T + 1] for i in range(n)]


def lm_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


@torch.no_grad()
def evaluate_lm(model, windows: list[np.ndarray], token_bytes: torch.Tensor, batch_size: int = 16) -> dict:
    """Validation cross-entropy and bits per byte.

    bpb = sum of -log2 p(target) / sum of UTF-8 bytes of the targets: unlike loss per token, it does not
    depend on the tokenizer, so models with different vocabularies can be compared.
    """
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    nats, n_tok, n_bytes = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        rows = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64)).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        _, loss = model(x, y, loss_reduction="none")
        nats += loss.float().sum().item()
        n_tok += y.numel()
        n_bytes += token_bytes[y].sum().item()
    return {"val_loss": nats / max(n_tok, 1), "val_bpb": nats / math.log(2) / max(n_bytes, 1)}


@dataclass
class PretrainConfig(TrainConfig):
    data: Optional[str] = None
    """Prepared dataset dir (from `picochat data prepare`), or a text file / folder / JSONL to prepare; omit for the embedded Brown corpus."""
    preset: str = "tiny"
    """Model and schedule preset: tiny, small, gpt2, ... (see picochat/model/config.py)."""
    eval_windows: int = 256
    """Validation windows (of block_size tokens) scored at each evaluation."""


def _prepare_data(cfg: PretrainConfig, model_cfg: ModelConfig) -> Path:
    from ..data.prepare import ensure_default_dataset, prepare_dataset
    if cfg.data is None:
        return ensure_default_dataset(vocab_size=model_cfg.vocab_size)
    src = Path(cfg.data)
    if (src / "meta.json").is_file():
        return src
    if not src.exists():
        raise PicochatError(f"data {src} does not exist; pass a prepared dataset dir, a text file, "
                            "a folder of text files or a JSONL file")
    return prepare_dataset(src, out_dir=Path(cfg.out_dir) / "data", vocab_size=model_cfg.vocab_size)


def pretrain(cfg: PretrainConfig, model_overrides: Optional[dict] = None) -> list[dict]:
    """Train a GPT from scratch; returns the metric rows. The plain-Python form of `picochat pretrain`."""
    from ..data.prepare import load_meta
    from ..model.gpt import GPT
    from ..tokenizer import Tokenizer

    model_cfg = preset(cfg.preset, **(model_overrides or {}))
    data_dir = _prepare_data(cfg, model_cfg)
    meta = load_meta(data_dir)
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    if meta["vocab_size"] != model_cfg.vocab_size:
        # the data decides the vocabulary: the embedding must cover every id in it
        model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    T = model_cfg.block_size
    train = TokenWindows(data_dir / "train.bin", meta["dtype"], T, cfg.seed)
    val_windows = TokenWindows(data_dir / "val.bin", meta["dtype"], T, cfg.seed).sequential(cfg.eval_windows)
    token_bytes = torch.tensor([len(tokenizer.token_bytes(i)) if i not in tokenizer.special_tokens.values() else 0
                                for i in range(tokenizer.vocab_size)] +
                               [0] * (model_cfg.vocab_size - tokenizer.vocab_size))
    B = cfg.batch_size
    # global micro-batch m of step s holds samples starting at s*(B*accum*world) + m*B (see loop.py)
    trainer_box: list[Trainer] = []

    def batch_fn(step: int, micro: int):
        per_step = B * cfg.grad_accum * trainer_box[0].dist.world
        return train.batch(step * per_step + micro * B, B)

    trainer = Trainer(cfg, model, batch_fn, lm_loss,
                      eval_fn=lambda m: evaluate_lm(m, val_windows, token_bytes, batch_size=B),
                      tokenizer=tokenizer, tokens_per_micro=B * T,
                      run_info={"data": str(data_dir), "preset": cfg.preset,
                                "params": model.num_params(), "active_params": model_cfg.num_params(active=True)})
    trainer_box.append(trainer)
    if trainer.dist.is_main:
        moe = (f" ({model_cfg.num_params(active=True) / 1e6:.2f}M active per token: {model_cfg.moe_experts} experts, "
               f"top-{model_cfg.moe_top_k})") if model_cfg.moe_experts else ""
        print(f"model: {model.num_params() / 1e6:.2f}M parameters{moe}, {model_cfg.n_layer} layers, d={model_cfg.n_embd}, "
              f"context {T}; data: {meta['train_tokens']:,} train tokens; device {trainer.device}, "
              f"{str(trainer.amp_dtype).replace('torch.', '')}, world {trainer.dist.world}")
    rows = trainer.fit()
    if trainer.dist.is_main and rows:
        evals = [r for r in rows if "val_bpb" in r]
        if evals:
            print(f"done: step {trainer.step}, val loss {evals[-1]['val_loss']:.4f}, "
                  f"val bpb {evals[-1]['val_bpb']:.4f}; checkpoint {cfg.out_dir}, plot {cfg.out_dir}/loss.png"
                  + (f", expert load {cfg.out_dir}/moe_load.png" if model_cfg.moe_experts else ""))
    return rows


# model flags the CLI exposes as overrides of the preset, with their types
MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_kv_head": int, "n_embd": int, "block_size": int,
               "vocab_size": int, "ffn_hidden": int, "pos": str, "norm": str, "norm_position": str,
               "activation": str, "dropout": float, "rope_base": float,
               "moe_experts": int, "moe_top_k": int, "moe_aux_loss_coef": float, "moe_z_loss_coef": float}
# training fields whose default comes from the preset unless given on the command line
PRESET_FIELDS = sorted({k for v in TRAIN_PRESETS.values() for k in v} | {"out_dir"})


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a GPT from scratch by next-token prediction",
                       description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, PretrainConfig, positional=("data",))
    # None = "not given": the preset fills it in (see run_pretrain)
    p.set_defaults(**{k: None for k in PRESET_FIELDS})
    for action in p._actions:
        if action.dest in PRESET_FIELDS and action.help:
            action.help = action.help.split(" (default:")[0] + " (default: the preset's)"
    g = p.add_argument_group("model overrides (default: the preset's value)")
    from ..cli_args import field_docs
    docs = field_docs(ModelConfig)
    dense = ModelConfig()
    for name, kind in MODEL_FLAGS.items():
        # no preset sets the mixture-of-experts fields: their defaults are ModelConfig's
        shown = f" (default: {getattr(dense, name)})" if name.startswith("moe_") else ""
        g.add_argument("--" + name.replace("_", "-"), dest="model_" + name, type=kind, default=None,
                       metavar=name.upper(), help=docs.get(name, "") + shown)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args) -> int:
    if args.preset not in PRESETS:
        raise PicochatError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = TRAIN_PRESETS.get(args.preset, {}) | {"out_dir": f"runs/{args.preset}"}
    defaults = PretrainConfig()
    for k in PRESET_FIELDS:
        if getattr(args, k) is None:
            setattr(args, k, recipe.get(k, getattr(defaults, k)))
    cfg = dataclass_from_args(PretrainConfig, args)
    overrides = {n: getattr(args, "model_" + n) for n in MODEL_FLAGS if getattr(args, "model_" + n) is not None}
    if "n_head" in overrides and "n_kv_head" not in overrides:
        overrides["n_kv_head"] = None  # plain multi-head unless asked otherwise
    if "n_embd" in overrides or "n_head" in overrides:
        overrides.setdefault("head_dim", None)
    if "n_embd" in overrides or "activation" in overrides:
        overrides.setdefault("ffn_hidden", None)
    moe_only = sorted(n for n in overrides if n.startswith("moe_") and n != "moe_experts")
    if moe_only and not overrides.get("moe_experts"):  # they would be ignored by a dense model
        raise PicochatError(f"--{moe_only[0].replace('_', '-')} only applies to a mixture-of-experts model; "
                            "add --moe-experts N (N >= 2), e.g. --moe-experts 8 --moe-top-k 2")
    pretrain(cfg, overrides)
    return 0
