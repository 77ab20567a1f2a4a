"""picochat's checkpoint format and the atomic writes that make it survive a kill.

A checkpoint is a directory:
    config.json          {"format": "picochat", "version": 1, "model": ModelConfig}
    model.safetensors    weights (safetensors: no pickle, so loading a stranger's file is safe)
    tokenizer.json       the tokenizer the model was trained with
    optimizer.safetensors + state.json   only in training checkpoints (AdamW moments, step, RNG states)

A run directory holds several under checkpoints/step_NNNNNNN/ and a one-line file ``latest`` naming
the newest complete one. Each checkpoint is written into a temporary directory, fsynced, renamed into
place, and only then is ``latest`` replaced (os.replace is atomic): a kill at any moment leaves the
previous checkpoint both intact and pointed to.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PicochatError
from ..fsutil import atomic_dir, atomic_write
from ..model.config import ModelConfig

FORMAT, VERSION = "picochat", 1


def save_model(model, out_dir: str | Path, tokenizer=None, extra_files: Optional[dict] = None,
               meta: Optional[dict] = None) -> Path:
    """Write config + weights (+ tokenizer, + extra {name: bytes|callable(path)}) as one atomic directory.
    meta: more top-level keys for config.json (a multimodal model's "vision", checkpoints/vlm.py)."""
    from ..model.quant import is_quantized
    if is_quantized(model):  # its int8 buffers would not load back into a GPT
        raise PicochatError("cannot save an int8-quantized model; save the original and quantize when loading")
    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "model": model.config.to_dict()} | (meta or {}), indent=2))
        # tied weights are one tensor under two names; safetensors stores each storage once
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not (model.config.tie_embeddings and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
    return atomic_dir(out_dir, fill, extra_files)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (follows ``latest``), -> the checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise PicochatError(f"no checkpoint at {path}: pass a run directory (from `picochat pretrain`) "
                            "or a checkpoint directory containing config.json and model.safetensors")
    if path.is_dir() and (path / "latest").is_file():
        target = path / (path / "latest").read_text().strip()
        if not ((target / "config.json").is_file() or (target / "adapter.json").is_file()):  # (a LoRA run)
            raise PicochatError(f"{path}/latest points to {target}, which is missing; "
                                f"pass one of the directories in {path}/checkpoints explicitly")
        return target
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise PicochatError(f"{path} is not a picochat checkpoint (no config.json + model.safetensors, "
                        "no `latest` file); for Hugging Face or GGUF weights use `picochat import`")


def read_config(ckpt: Path) -> ModelConfig:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"{ckpt}/config.json is unreadable or corrupt ({e}); use another checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = " (it looks like a Hugging Face model: use `picochat import`)" if "model_type" in meta else ""
        raise PicochatError(f"{ckpt}/config.json is not a picochat checkpoint config{hint}")
    if meta.get("version", 0) > VERSION:
        raise PicochatError(f"{ckpt} was written by a newer picochat (format v{meta['version']}); upgrade picochat")
    return ModelConfig.from_dict(meta["model"])


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise PicochatError(f"{path} is missing; the checkpoint is incomplete, use another one")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PicochatError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); "
                            "use an earlier checkpoint or re-download/re-train") from None


def load_weights_into(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names the first mismatching tensor, not a 50-line dump."""
    expected = {k: v for k, v in model.state_dict().items()
                if not (model.config.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PicochatError(f"{source} does not match this architecture: "
                            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise PicochatError(f"{source}: tensor {k} has shape {tuple(state[k].shape)} but the model "
                                f"expects {tuple(v.shape)}; the checkpoint is from another architecture")
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
               quantize: Optional[str] = None):
    """-> (GPT in eval mode, Tokenizer or None, checkpoint dir).

    ``path`` may also be a GGUF file or a model name such as ``smollm2`` (imported on the fly; the
    third item is then the GGUF file). ``quantize="int8"``: int8 weights for faster decoding, inference
    only (picochat/model/quant.py), quantized from the stored weights; ``dtype`` (default fp32) is then
    the activations' and the KV cache's. A LoRA adapter directory (or a run dir whose latest checkpoint
    is one) loads its base model with the adapter merged in (picochat/model/lora.py)."""
    from ..model.lora import is_adapter, load_adapter_model
    if is_adapter(path):
        return load_adapter_model(path, device=device, dtype=dtype, quantize=quantize)
    from ..model.gpt import GPT
    from .gguf import gguf_source
    gguf_file = gguf_source(path)
    if gguf_file is not None:  # converted once, then read back from picochat's own format (gguf_cache.py)
        from .gguf_cache import load_cached, load_cached_quantized
        if quantize not in (None, "", "none") and torch.device(device).type == "cpu":  # (cached as made)
            model, tokenizer = load_cached_quantized(gguf_file, quantize, dtype)
            return model, tokenizer, gguf_file
        model, tokenizer = load_cached(gguf_file, torch.float32 if quantize else dtype)  # (int8: from fp32)
        return place_model(model, device, dtype, quantize, tokenizer), tokenizer, gguf_file
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    model = GPT(config)
    load_weights_into(model, load_state(ckpt / "model.safetensors"), str(ckpt))
    tokenizer = read_tokenizer(ckpt)
    return place_model(model, device, dtype, quantize, tokenizer), tokenizer, ckpt


def place_model(model, device, dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None, tokenizer=None):
    """Loaded fp32 weights -> the model to run: quantized (from fp32, not a bf16 copy; calibrated on a text
    when the `tokenizer` is given, model/quant.py) or cast, in eval mode."""
    from ..model.quant import quantize_model
    if quantize:
        if tokenizer is None and quantize == "int8":
            warnings.warn("this checkpoint has no tokenizer.json, so its int8 rows are rounded without the "
                          "activation-aware calibration (model/quant.py), a little further from the float model")
        model = quantize_model(model.to(device), quantize, dtype, tokenizer)
    else:
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def read_tokenizer(folder: Path, default=None):
    """The folder's tokenizer.json, or `default` when it has none."""
    if not (folder / "tokenizer.json").is_file():
        return default
    from ..tokenizer import Tokenizer
    return Tokenizer.load(folder / "tokenizer.json")


class CheckpointManager:
    """checkpoints/step_NNNNNNN/ directories in a run dir, a ``latest`` pointer, and pruning."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def latest(self) -> Optional[Path]:
        pointer = self.run_dir / "latest"
        if not pointer.is_file():
            return None
        return resolve_checkpoint(self.run_dir)

    def save(self, step: int, model, tokenizer, extra_files: dict, writer=None) -> Path:
        """writer(out_dir, extra_files): writes the directory instead of save_model (an adapter run). The
        checkpoint counts once `latest` names it, so a kill while writing leaves the previous one current."""
        name = f"checkpoints/step_{step:07d}"
        if writer is None:
            path = save_model(model, self.run_dir / name, tokenizer, extra_files)
        else:
            path = self.run_dir / name
            writer(path, extra_files)
        atomic_write(self.run_dir / "latest", name + "\n")
        self._prune(keep_also=path)
        return path

    def _prune(self, keep_also: Path) -> None:
        ckpts = sorted((self.run_dir / "checkpoints").glob("step_*"))
        for old in ckpts[:-self.keep] if self.keep > 0 else []:
            if old != keep_also:
                shutil.rmtree(old, ignore_errors=True)
