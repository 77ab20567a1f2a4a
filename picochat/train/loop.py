"""The one training loop every stage shares (pretraining now; SFT, reward, PPO, DPO later).

A stage supplies the model, a ``batch_fn(step, micro) -> batch`` that is a pure function of its
arguments (so resuming needs no data-loader state beyond the step), a ``loss_fn(model, batch)``,
and an ``eval_fn(model) -> dict``. The loop does the rest: AdamW, warmup + cosine, accumulation,
clipping, autocast, compile, DDP, metrics, plots, progress, atomic checkpoints and exact resume.
A stage that trains only part of a model (LoRA) also supplies how its weights are written into a
checkpoint and read back (``save_weights``, ``load_weights``); by default the whole model is.
A loss_fn may return (loss, stats): the stats (floats, e.g. a reward model's pairwise accuracy) are
averaged into the next metrics row.

Mixture-of-experts models (model/moe.py): the loop, not each stage, adds the routers' coef-weighted
balance and z-losses to whatever the stage's loss_fn returned, so pretraining, SFT, DPO, reward and PPO
all keep the experts balanced (a router trained without them collapses onto a few experts). The
logged ``loss`` stays the stage's own loss, comparable with a dense model's; ``moe/balance_loss``,
``moe/z_loss`` and ``moe/load`` (per layer, per expert: fraction of token-slots since the last row) are
logged beside it, and moe_load.png plots the load over training.

Exactness across process counts: a step consumes ``grad_accum * world`` micro-batches; micro-batch
m of rank r is global micro-batch m * world + r, and every micro loss is divided by grad_accum
before DDP averages over ranks. So 2 processes x accum A see the same data and the same gradient as
1 process x accum 2A.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..checkpoints.io import CheckpointManager, load_state, load_weights_into, read_config
from ..fsutil import atomic_write
from ..device import pick_device, pick_dtype, tune_cpu_allocator
from ..errors import PicochatError
from ..model.moe import moe_layers, pop_aux_loss, pop_load
from .dist import DistInfo, all_reduce_mean, barrier, init_distributed
from .metrics import MetricsLog, plot_metrics, plot_moe_load
from .optim import lr_at, make_optimizer


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    """Run directory: checkpoints, metrics.jsonl, loss.png."""
    max_steps: int = 1000
    """Optimizer steps to train for (the schedule decays to its minimum at this step)."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (per process)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_frac: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 100
    """Evaluate every this many steps (and at the end)."""
    ckpt_every: int = 200
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    dtype: str = "auto"
    """Autocast dtype: auto (bf16 where fast), fp32, bf16, fp16."""
    compile: bool = False
    """torch.compile the model (slow first step; faster after on bf16)."""
    device: str = "auto"
    """cpu, cuda, mps or auto."""
    seed: int = 1337
    """Seed for initialisation, data order and dropout."""
    resume: bool = False
    """Continue from the latest checkpoint in out_dir, exactly where it stopped."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise PicochatError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (0 < self.lr < 1):
            raise PicochatError(f"--lr must be in (0, 1), got {self.lr}; typical values are 1e-4 to 3e-3")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_frac <= 1 or self.weight_decay < 0 or self.grad_clip < 0:
            raise PicochatError("--warmup-steps, --weight-decay and --grad-clip must be >= 0 and "
                                "--min-lr-frac in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise PicochatError(f"AdamW betas must be in [0, 1), got {self.beta1}, {self.beta2}")


class Trainer:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, batch_fn: Callable, loss_fn: Callable,
                 eval_fn: Optional[Callable] = None, tokenizer=None, tokens_per_micro: int = 0,
                 run_info: Optional[dict] = None, save_weights: Optional[Callable] = None,
                 load_weights: Optional[Callable] = None, lr_mult: Optional[Callable[[str], float]] = None):
        """lr_mult(parameter name) scales the learning rate of some parameters (optim.make_optimizer).
        save_weights(out_dir, extra_files) writes a checkpoint directory of the model's weights plus
        extra_files ({name: bytes | callable(path)}); load_weights(ckpt_dir) reads them back into the
        model. Both default to the whole model in picochat's checkpoint format."""
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = pick_dtype(cfg.dtype, self.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()  # no page faults on every big activation of every step
        self.raw_model = model.to(self.device)
        self.moe = moe_layers(self.raw_model, collect=True)  # [] for a dense model: nothing extra per step
        self.batch_fn, self.loss_fn, self.eval_fn = batch_fn, loss_fn, eval_fn
        self.tokenizer = tokenizer
        self.tokens_per_micro = tokens_per_micro
        self.run_dir = Path(cfg.out_dir)
        self.ckpts = CheckpointManager(self.run_dir, keep=cfg.keep_checkpoints)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device.type,
                                        lr_mult)
        self.step = 0
        self._stats: dict[str, tuple[float, int]] = {}  # loss_fn's own metrics since the last row: (sum, count)
        self.run_info = run_info or {}
        self.save_weights, self.load_weights = save_weights, load_weights
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

    # ---- checkpoint state --------------------------------------------------------------------------
    def _rng_states(self) -> list[torch.Tensor]:
        state = torch.get_rng_state()
        if self.device.type == "cuda":
            state = torch.cat([state, torch.cuda.get_rng_state(self.device)])
        if self.dist.world == 1:
            return [state]
        gathered = [None] * self.dist.world
        dist.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self) -> None:
        rngs = self._rng_states()  # collective: every rank takes part
        if self.dist.is_main:
            opt = self.optimizer.state_dict()
            tensors = {f"rng.{r}": s for r, s in enumerate(rngs)}
            for idx, st in opt["state"].items():
                for key, val in st.items():
                    tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
            groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                      for g in opt["param_groups"]]
            state_json = json.dumps({"step": self.step, "world": self.dist.world, "param_groups": groups,
                                     "train_config": asdict(self.cfg), "run": self.run_info}, indent=1)
            self.ckpts.save(self.step, self.raw_model, self.tokenizer, {
                "optimizer.safetensors": lambda p: save_file(tensors, str(p)),
                "state.json": state_json.encode(),
            }, writer=self.save_weights)
        barrier(self.dist)

    def load_checkpoint(self) -> bool:
        ckpt = self.ckpts.latest()
        if ckpt is None:
            return False
        if self.tokenizer is not None and (ckpt / "tokenizer.json").is_file():
            # same shapes, other ids (e.g. data re-made with another tokenizer): resuming would mix them
            from ..tokenizer import Tokenizer
            theirs = Tokenizer.load(ckpt).fingerprint()
            if theirs != self.tokenizer.fingerprint():
                raise PicochatError(f"cannot resume: {ckpt} was trained with another tokenizer (fingerprint "
                                    f"{theirs}, this run's data uses {self.tokenizer.fingerprint()}); use the data "
                                    f"it was trained on, or a new --out-dir")
        if self.load_weights is not None:
            self.load_weights(ckpt)
        else:
            saved = read_config(ckpt)
            if saved.to_dict() != self.raw_model.config.to_dict():
                diff = [f"{k}={v} (now {self.raw_model.config.to_dict()[k]})"
                        for k, v in saved.to_dict().items() if self.raw_model.config.to_dict()[k] != v]
                raise PicochatError(f"cannot resume: {ckpt} was trained with a different model "
                                    f"({', '.join(diff[:4])}); use the same preset/options or a new --out")
            load_weights_into(self.raw_model, load_state(ckpt / "model.safetensors"), str(ckpt))
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PicochatError(f"{ckpt}/state.json is missing or corrupt ({e}); it is not a training checkpoint")
        tensors = load_state(ckpt / "optimizer.safetensors")
        opt_state: dict = {}
        for name, val in tensors.items():
            if name.startswith("state."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = val
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        if state["world"] != self.dist.world:
            raise PicochatError(f"cannot resume exactly: the checkpoint was written by {state['world']} "
                                f"process(es), this run has {self.dist.world}; use the same torchrun --nproc-per-node")
        rng = tensors[f"rng.{self.dist.rank}"]
        n_cpu = torch.get_rng_state().numel()
        torch.set_rng_state(rng[:n_cpu])
        if self.device.type == "cuda" and rng.numel() > n_cpu:
            torch.cuda.set_rng_state(rng[n_cpu:], self.device)
        self.step = state["step"]
        return True

    # ---- the loop ----------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def evaluate(self) -> dict:
        if self.eval_fn is None:
            return {}
        self.raw_model.eval()
        with torch.no_grad(), self.autocast():
            out = self.eval_fn(self.raw_model)
        self.raw_model.train()
        return out

    def train_step(self) -> tuple[float, float]:
        cfg, world = self.cfg, self.dist.world
        lr = lr_at(self.step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        total = torch.zeros((), device=self.device)
        pop_aux_loss(self.moe)  # drop anything recorded outside a training step
        for micro in range(cfg.grad_accum):
            batch = self.batch_fn(self.step, micro * world + self.dist.rank)
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            # DDP: only the last micro-batch all-reduces the accumulated gradients
            sync = micro == cfg.grad_accum - 1 or world == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self.autocast():
                    loss = self.loss_fn(self.model, batch)
                if isinstance(loss, tuple):  # (loss, {name: float}): averaged into the next metrics row
                    loss, stats = loss
                    self._add_stats(stats)
                aux, aux_stats = pop_aux_loss(self.moe)  # (None, {}) for a dense model
                self._add_stats(aux_stats)
                loss = loss / cfg.grad_accum
                (loss if aux is None else loss + aux / cfg.grad_accum).backward()
            total += loss.detach()  # the stage's loss only: comparable with a dense model's
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return all_reduce_mean(total, self.dist).item(), grad_norm.item()

    def _add_stats(self, stats: dict) -> None:
        for k, v in stats.items():
            total_k, n_k = self._stats.get(k, (0.0, 0))
            self._stats[k] = (total_k + float(v), n_k + 1)

    def pop_moe_load(self) -> dict:
        """{"moe/load": [[fraction of token-slots per expert] per layer]} since the last row, over all processes."""
        if not self.moe:
            return {}
        counts = pop_load(self.moe).to(self.device, torch.float64)  # (L, N)
        if self.dist.world > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        frac = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        return {"moe/load": [[round(float(v), 4) for v in layer] for layer in frac]}

    def pop_stats(self) -> dict:
        """Means (over the micro-batches since the last call that reported each, and over processes) of what
        loss_fn reported. Every process must report the same names (a stage's loss_fn does)."""
        if not self._stats:
            return {}
        keys = sorted(self._stats)
        vals = torch.tensor([self._stats[k][0] / self._stats[k][1] for k in keys], device=self.device)
        if self.dist.world > 1:
            vals = all_reduce_mean(vals, self.dist)
        self._stats = {}
        return {k: round(float(v), 6) for k, v in zip(keys, vals)}

    def fit(self) -> list[dict]:
        cfg = self.cfg
        resumed = cfg.resume and self.load_checkpoint()
        if cfg.resume and not resumed and self.dist.is_main:
            print(f"no checkpoint in {self.run_dir}; starting from scratch")
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resumed else None) \
            if self.dist.is_main else None
        if self.dist.is_main:
            atomic_write(self.run_dir / "run.json", json.dumps(
                {"train": asdict(cfg), "model": self.raw_model.config.to_dict(), "world": self.dist.world,
                 "dtype": str(self.amp_dtype), "device": str(self.device)} | self.run_info, indent=2))
        self.raw_model.train()
        tokens_per_step = self.tokens_per_micro * cfg.grad_accum * self.dist.world
        flops_per_token = self.raw_model.config.flops_per_token() if hasattr(self.raw_model, "config") else 0
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc="resumed" if resumed else "train")
        t_last, steps_since = time.perf_counter(), 0
        start_time = time.perf_counter()
        while self.step < cfg.max_steps:
            loss, grad_norm = self.train_step()
            if not math.isfinite(loss):
                raise PicochatError(f"loss became {loss} at step {self.step}; lower --lr or use --dtype fp32")
            steps_since += 1
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or last:
                dt = time.perf_counter() - t_last
                tps = tokens_per_step * steps_since / max(dt, 1e-9)
                row = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                       "grad_norm": round(grad_norm, 4), "tokens": self.step * tokens_per_step,
                       "tokens_per_s": round(tps, 1), "tflops": round(tps * flops_per_token / 1e12, 4),
                       "elapsed_s": round(time.perf_counter() - start_time, 2)} | self.pop_stats() | self.pop_moe_load()
                if not tokens_per_step:  # a stage whose batches are not token rows (pairs, rollouts)
                    for k in ("tokens", "tokens_per_s", "tflops"):
                        row.pop(k)
                if metrics:
                    metrics.log(row)
                if bar:
                    bar.set_postfix(loss=f"{loss:.3f}", **({"tok_s": f"{tps:,.0f}"} if tokens_per_step else {}))
                t_last, steps_since = time.perf_counter(), 0
            if self.step % cfg.eval_every == 0 or last:
                out = self.evaluate()
                if out and metrics:
                    metrics.log({"step": self.step} | out)
                    plot_metrics(metrics.read(), self.run_dir / "loss.png", title=self.run_dir.name)
                    line = f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items())
                    bar.write(line) if bar else print(line, flush=True)
                if self.moe and metrics:
                    plot_moe_load(metrics.read(), self.run_dir / "moe_load.png", title=self.run_dir.name)
                t_last, steps_since = time.perf_counter(), 0  # eval time is not training throughput
            if self.step % cfg.ckpt_every == 0 or last:
                self.save_checkpoint()
                t_last = time.perf_counter()
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        return metrics.read() if metrics else []
