"""Train the vision transformer on the 8x8 digits (`picochat vision train`), beside an SVM on the same split.

    loss = -1/B sum_b log softmax(ViT(x_b))[y_b]      x_b: a training digit, slightly turned, scaled and moved

The shared ``Trainer`` (train/loop.py) runs it: AdamW, warmup + cosine, clipping, metrics.jsonl, loss.png,
atomic checkpoints and exact resume. Batches are a pure function of the step (an epoch-seeded shuffle of the
training images, and a step-seeded random affine transform of each). Validation accuracy is measured every
--eval-every steps; the test images (data.split_digits: fixed, stratified, never trained on) are scored once,
at the end, by the last model (no checkpoint is picked by any score). The defaults were chosen by 3-fold
cross-validation inside the training and validation images, never by the test images. In the same run scikit-learn's SVC is fitted on the same
training images and scored on the same test images: SVC() (RBF kernel, C=1, gamma='scale', on pixel/16,
the inputs the ViT reads), and the classic SVC(gamma=0.001) on the raw 0..16 pixels of scikit-learn's
digits example. Both go to results.json with the ViT's accuracy and seconds; accuracy.png draws the curves.

A checkpoint folder holds config.json ({"format": "picochat-vit", "model": ViTConfig, "task": ...}) and
model.safetensors, plus the optimizer state while training.

    picochat vision train --out-dir runs/vision
"""
from __future__ import annotations

import functools
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PicochatError
from ..fsutil import atomic_dir, atomic_write
from ..model.vit import ViT, ViTConfig, ViTShape
from ..train.loop import TrainConfig, Trainer
from . import data as D

FORMAT, VERSION = "picochat-vit", 1
TASK = {"dataset": "sklearn-digits", "image_size": D.IMAGE_SIZE, "pixel_max": D.PIXEL_MAX,
        "labels": [str(k) for k in range(10)]}


@dataclass
class VisionTrainConfig(ViTShape, TrainConfig):
    out_dir: str = "runs/vision"
    """Run directory: checkpoints (config.json, model.safetensors), metrics.jsonl, loss.png, accuracy.png,
    results.json."""
    test_fraction: float = 0.2
    """Fraction of each digit's images held out for the final test (never trained on, never used to choose)."""
    val_fraction: float = 0.1
    """Fraction of each digit's images held out for the validation accuracy watched during training."""
    split_seed: int = 0
    """Seed of the stratified shuffle that splits the images (fixed, so every run holds out the same ones)."""
    rotate: float = 10.0
    """Augmentation: turn each training image by up to this many degrees either way (0 = off)."""
    scale: float = 0.1
    """Augmentation: scale each training image by a factor in [1 - scale, 1 + scale] (0 = off)."""
    translate: float = 0.5
    """Augmentation: move each training image by up to this many pixels in x and in y, bilinearly (0 = off).
    Whole-pixel moves lose to sub-pixel ones here: 3-fold cross-validation inside the training and validation
    images, 1,200 steps: no augmentation 95.1%, random 1-pixel shifts 96.1%, rotate 10 + scale 0.1 +
    translate 0.5: 98.1% (2,400 steps: 98.7%), the same with translate 1: 96.5%."""
    max_steps: int = 2400
    """Optimizer steps (2400 x 64 images: 122 passes over the 1,259 training images)."""
    batch_size: int = 64
    """Images per micro-batch (64 with 2400 steps beat 128 with 1200, which costs the same: 98.7% vs 98.1%
    in cross-validation)."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only)."""
    beta2: float = 0.99
    """AdamW beta2."""
    eval_every: int = 200
    """Validation loss and accuracy every this many steps."""
    ckpt_every: int = 800
    """Write a checkpoint every this many steps (and at the end)."""
    dtype: str = "fp32"
    """Autocast dtype: fp32, bf16, fp16 or auto (bf16 where fast). fp32 by default: at these sizes (64-wide
    matrices) bf16 autocast ran 2x slower than fp32 on the project's CPU (casts cost more than they save)."""
    log_every: int = 50
    """Write a metrics line every this many steps."""
    threads: int = 1
    """CPU threads for torch (0 = torch's default, one per core). 1 by default: these ops are too small to share,
    and a 2-thread team waits at every op while another process holds a core (300 steps on the 2-core
    machine with two other jobs running: 20 s on 1 thread, 242 s on 2)."""

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        ViTShape.__post_init__(self)
        self.model_config()  # widths, heads, patch size: checked before any data is read
        D.split_digits(torch.zeros(10, dtype=torch.long), self.test_fraction, self.val_fraction)  # checks them
        if not (0 <= self.rotate <= 180 and 0 <= self.scale < 1 and 0 <= self.translate <= D.IMAGE_SIZE / 2):
            raise PicochatError(f"augmentation out of range: --rotate {self.rotate} must be in [0, 180] degrees, "
                                f"--scale {self.scale} in [0, 1), --translate {self.translate} in [0, "
                                f"{D.IMAGE_SIZE // 2}] pixels")
        if self.threads < 0:
            raise PicochatError(f"--threads must be >= 0 (0 = one per core), got {self.threads}")

    def model_config(self) -> ViTConfig:
        return ViTConfig(image_size=D.IMAGE_SIZE, channels=1, num_classes=10, **self.shape())


# ---- the checkpoint folder -------------------------------------------------------------------------------
def save_vision(model: ViT, out_dir, extra_files: dict | None = None, split: dict | None = None) -> Path:
    """config.json + model.safetensors (+ extra files), written as one atomic directory."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                     "model": model.config.to_dict(),
                                                     "task": TASK | ({"split": split} if split else {})}, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return atomic_dir(out_dir, fill, extra_files)


def read_vision_config(ckpt: Path) -> tuple[ViTConfig, dict]:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"{ckpt}/config.json is unreadable ({e}); use another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        kind = meta.get("format", meta.get("model_type")) if isinstance(meta, dict) else None
        raise PicochatError(f"{ckpt} is not a vision model (its config.json is a {kind or 'unknown'!s} model's); "
                            "train one with `picochat vision train --out-dir DIR`")
    if meta.get("version", 0) > VERSION:
        raise PicochatError(f"{ckpt} was written by a newer picochat (format v{meta['version']}); upgrade picochat")
    return ViTConfig.from_dict(meta["model"]), meta.get("task", {})


def resolve_vision(path) -> Path:
    """A run directory (follows `latest`) or a checkpoint folder -> the checkpoint folder, or a clear error."""
    from ..checkpoints.io import resolve_checkpoint
    path = Path(path)
    if not path.exists():
        raise PicochatError(f"no vision model at {path}: train one with `picochat vision train --out-dir {path}`")
    if not (path.is_dir() and ((path / "latest").is_file() or (path / "config.json").is_file())):
        raise PicochatError(f"{path} is not a vision run (no config.json, no `latest` file): pass the run directory "
                            "of `picochat vision train` or one of its checkpoint folders")
    ckpt = resolve_checkpoint(path)
    read_vision_config(ckpt)
    return ckpt


def load_weights(model: ViT, ckpt: Path) -> None:
    from ..checkpoints.io import load_state
    state = load_state(ckpt / "model.safetensors")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise PicochatError(f"{ckpt} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                            f"wrong shape {bad[:3]}; the checkpoint is damaged or from another picochat")
    model.load_state_dict(state)


def load_vision(path, device: str = "cpu") -> tuple[ViT, dict, Path]:
    """-> (ViT in eval mode, the task facts of config.json, the checkpoint folder)."""
    ckpt = resolve_vision(path)
    config, task = read_vision_config(ckpt)
    model = ViT(config)
    load_weights(model, ckpt)
    return model.to(device).eval(), task, ckpt


# ---- evaluation and the baseline --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: ViT, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> dict:
    """Accuracy and mean loss of the model on (N, 8, 8) pixel counts, and its predictions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, loss = [], 0.0
    for s in range(0, len(images), batch_size):
        x, y = D.to_model_input(images[s:s + batch_size]).to(device), labels[s:s + batch_size].to(device)
        logits, l = model(x, y)
        preds.append(logits.float().argmax(-1).cpu())
        loss += float(l) * len(y)
    model.train(was_training)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return {"accuracy": float((pred == labels).float().mean()) if len(labels) else 0.0,
            "loss": loss / max(len(labels), 1), "pred": pred}


def svc_baselines(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    """scikit-learn SVCs fitted on the training images and scored on the test images (one process, timed)."""
    from sklearn.svm import SVC
    out = {}
    for key, name, make, scale in (
            ("baseline", "SVC() = RBF kernel, C=1, gamma='scale', on pixel/16", lambda: SVC(), D.PIXEL_MAX),
            ("baseline_classic", "SVC(gamma=0.001) on raw 0..16 pixels (scikit-learn's digits example)",
             lambda: SVC(gamma=0.001), 1)):
        t = time.perf_counter()
        clf = make().fit((train_x.flatten(1) / scale).numpy(), train_y.numpy())
        acc = float((torch.from_numpy(clf.predict((test_x.flatten(1) / scale).numpy())) == test_y).float().mean())
        out[key] = {"name": name, "test_accuracy": round(acc, 4),
                    "test_correct": round(acc * len(test_y)), "seconds": round(time.perf_counter() - t, 3)}
    return out


def plot_accuracy(rows: list[dict], results: dict, out_png: Path) -> None:
    """Loss and accuracy against step: training batches (augmented), validation, and the final test lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss (augmented)")
    a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val loss")
    a.set_yscale("log"); a.set_xlabel("step"); a.set_ylabel("cross-entropy"); a.grid(alpha=0.3); a.legend()
    b.plot([r["step"] for r in train if "accuracy" in r], [r["accuracy"] for r in train if "accuracy" in r],
           lw=1, label="train batch accuracy (augmented)")
    b.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", ms=3, label="val accuracy")
    b.axhline(results["test_accuracy"], color="C2", ls="--", label=f"ViT test {results['test_accuracy']:.2%}")
    b.axhline(results["baseline"]["test_accuracy"], color="C3", ls=":",
              label=f"SVC test {results['baseline']['test_accuracy']:.2%}")
    b.set_ylim(0.9, 1.0); b.set_xlabel("step"); b.set_ylabel("accuracy"); b.grid(alpha=0.3); b.legend()
    a.set_title("ViT on the 8x8 digits: loss"); b.set_title("accuracy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out_png, buf.getvalue())


# ---- training ---------------------------------------------------------------------------------------------
def vision_train(cfg: VisionTrainConfig) -> dict:
    """Train the ViT, score the test images beside the SVC baseline; returns (and writes) results.json's dict."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images, labels = D.load_digits()
    split = D.split_digits(labels, cfg.test_fraction, cfg.val_fraction, cfg.split_seed)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = ((images[split[k]], labels[split[k]]) for k in ("train", "val", "test"))
    split_info = {"train": len(tr_y), "val": len(va_y), "test": len(te_y), "seed": cfg.split_seed,
                  "test_fraction": cfg.test_fraction, "val_fraction": cfg.val_fraction,
                  "test_fingerprint": D.split_fingerprint(split["test"])}
    torch.manual_seed(cfg.seed)
    model = ViT(cfg.model_config())
    B, N = cfg.batch_size, len(tr_y)
    train_x = D.to_model_input(tr_x)
    box: list[Trainer] = []

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> torch.Tensor:
        return D.epoch_order(N, epoch, cfg.seed)

    def batch_fn(step: int, micro: int):  # image j of the run is image j % N of epoch j // N's shuffle
        first = (step * cfg.grad_accum + micro) * B
        idx = torch.stack([order(j // N)[j % N] for j in range(first, first + B)])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
        return D.random_affine(train_x[idx], cfg.rotate, cfg.scale, cfg.translate, g), tr_y[idx]

    def loss_fn(m, batch):
        logits, loss = m(*batch)
        return loss, {"accuracy": (logits.argmax(-1) == batch[1]).float().mean().item()}

    def eval_fn(m):
        out = evaluate(m, va_x, va_y)
        return {"val_loss": out["loss"], "val_accuracy": out["accuracy"]}

    def save_weights(path, extra_files):
        save_vision(box[0].raw_model, path, extra_files, split=split_info)

    def load(ckpt: Path):
        config, task = read_vision_config(ckpt)
        if config.to_dict() != model.config.to_dict():
            raise PicochatError(f"cannot resume: {ckpt} was trained with another model; use the same options "
                                "or a new --out-dir")
        if task.get("split") != split_info:
            raise PicochatError(f"cannot resume: {ckpt} was trained on another split ({task.get('split')}); use the "
                                "same --test-fraction, --val-fraction and --split-seed, or a new --out-dir")
        load_weights(box[0].raw_model, ckpt)

    run_info = {"stage": "vision", "split": split_info, "params": model.num_params()}
    trainer = Trainer(cfg, model, batch_fn, loss_fn, eval_fn=eval_fn, run_info=run_info,
                      save_weights=save_weights, load_weights=load)
    box.append(trainer)
    if trainer.dist.world > 1:
        raise PicochatError("the ViT trains in one process (it takes minutes); run it without torchrun")
    if cfg.progress:
        print(f"ViT: {model.num_params():,} parameters, {model.config.n_tokens} tokens per image; "
              f"{N} training, {len(va_y)} validation and {len(te_y)} test images; {torch.get_num_threads()} threads")
    start_step = None
    if cfg.resume and trainer.ckpts.latest() is not None:
        start_step = json.loads((trainer.ckpts.latest() / "state.json").read_text()).get("step")
    rows = trainer.fit()
    train_s = time.perf_counter() - t0
    model = trainer.raw_model.eval()
    test, val = evaluate(model, te_x, te_y), evaluate(model, va_x, va_y)  # fp32, as `picochat vision predict`
    errors = [{"index": split["test"][i], "label": int(te_y[i]), "predicted": int(test["pred"][i])}
              for i in torch.nonzero(test["pred"] != te_y).flatten().tolist()]
    results = {"test_accuracy": round(test["accuracy"], 4), "test_correct": len(te_y) - len(errors),
               "test_n": len(te_y), "test_errors": errors, "val_accuracy": round(val["accuracy"], 4),
               **svc_baselines(tr_x, tr_y, te_x, te_y), "split": split_info,
               "model": model.config.to_dict(), "params": model.num_params(), "steps": cfg.max_steps,
               "resumed_from_step": start_step, "train_seconds": round(train_s, 1),
               "dtype": str(trainer.amp_dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(Path(cfg.out_dir) / "results.json", json.dumps(results, indent=2))
    plot_accuracy(rows, results, Path(cfg.out_dir) / "accuracy.png")
    return results
