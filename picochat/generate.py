"""`picochat generate CHECKPOINT --prompt ...`: sample a continuation, streamed to the terminal.

Generation runs on the KV-cache engine (picochat/engine): the prompt is prefilled once, then each
new token costs one single-token forward pass.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch

from .cli_args import add_dataclass_args, dataclass_from_args
from .engine.compiled import COMPILE_WORTH_TOKENS
from .engine.engine import Engine, SamplingParams
from .engine.sampling import Utf8Stream
from .errors import PicochatError


@dataclass
class GenerateConfig:
    checkpoint: str = ""
    """Run directory or checkpoint directory (from `picochat pretrain` or `picochat import`), a .gguf file, or smollm2."""
    prompt: str = ""
    """Text to continue (empty: start from <|endoftext|>, i.e. a new document)."""
    max_tokens: int = 200
    """Maximum number of tokens to generate."""
    temperature: float = 0.8
    """Sampling temperature; 0 = greedy (always the most likely token)."""
    top_k: Optional[int] = 50
    """Sample only among the k most likely tokens (0 = off)."""
    top_p: Optional[float] = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    seed: Optional[int] = None
    """Random seed, for a reproducible sample."""
    num_samples: int = 1
    """How many independent samples to print."""
    device: str = "auto"
    """cpu, cuda, mps or auto."""
    quantize: Optional[Literal["int8", "int4"]] = None
    """int8 or int4 weights (quantized on load): faster decoding on CPUs (SmolLM2 here: int8 5-6x, int4 7-8x fp32's); outputs differ slightly from the full-precision model."""
    fast: Literal["auto", "compile", "plain"] = "auto"
    """Decode step: auto = compiled by TorchInductor on CPUs (~2x faster tokens; compiling takes 20-60 s, so only
    from 2,000 tokens to generate up); compile = always compile first; plain = never compile."""


def generate_ids(model, prompt_ids: list[int], max_tokens: int, temperature: float = 0.8,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, stop_ids: tuple[int, ...] = (),
                 fast: str = "auto") -> Iterator[int]:
    """Yield new token ids one at a time until max_tokens, a stop id, or the context is full."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=tuple(stop_ids))
    yield from Engine(model, fast=fast).generate_tokens(prompt_ids, params, generator=generator)


def generate(cfg: GenerateConfig, out=None) -> list[str]:
    """Print and return num_samples continuations of cfg.prompt."""
    out = out or sys.stdout
    from .checkpoints.io import load_model
    from .device import pick_device

    if cfg.max_tokens < 1:
        raise PicochatError(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
    model, tokenizer, _ = load_model(cfg.checkpoint, device=pick_device(cfg.device), quantize=cfg.quantize)
    if tokenizer is None:
        raise PicochatError(f"{cfg.checkpoint} has no tokenizer.json; it cannot turn text into tokens")
    prompt_ids = tokenizer.encode(cfg.prompt) if cfg.prompt else [tokenizer.eot_id]
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    texts = []
    fast = cfg.fast
    if fast == "auto" and cfg.max_tokens * cfg.num_samples < COMPILE_WORTH_TOKENS:
        fast = "plain"  # compiling would take longer than it saves (engine/compiled.py)
    for n in range(cfg.num_samples):
        if cfg.num_samples > 1:
            out.write(f"--- sample {n + 1} ---\n")
        out.write(cfg.prompt)
        stream, pieces = Utf8Stream(), []
        for tok in generate_ids(model, prompt_ids, cfg.max_tokens, cfg.temperature, cfg.top_k or None,
                                cfg.top_p, generator, stop_ids=(tokenizer.eot_id,), fast=fast):
            piece = stream.push(tokenizer.token_bytes(tok))
            pieces.append(piece)
            out.write(piece)
            out.flush()
        pieces.append(stream.flush())
        out.write(pieces[-1] + "\n")
        texts.append("".join(pieces))
    return texts


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained checkpoint",
                       description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, GenerateConfig, positional=("checkpoint",))
    p.set_defaults(func=lambda args: generate(dataclass_from_args(GenerateConfig, args)) and 0)
