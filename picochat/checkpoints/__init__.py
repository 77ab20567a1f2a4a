"""Checkpoints: picochat's own format (config.json + model.safetensors + tokenizer.json), written
atomically, plus importers for other people's weights (hf.py)."""
from .io import CheckpointManager, load_model, resolve_checkpoint, save_model

__all__ = ["CheckpointManager", "load_model", "save_model", "resolve_checkpoint"]
