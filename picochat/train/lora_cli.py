"""``picochat merge-lora RUN OUT``: fold a LoRA adapter into its base model and write a plain checkpoint.

RUN is an adapter directory (adapter.json + adapter.safetensors, from LoRA fine-tuning) or a run
directory whose latest checkpoint is one. OUT is an ordinary picochat checkpoint (config.json +
model.safetensors + tokenizer.json) that needs neither the adapter nor the base any more. Merging a
plain checkpoint (already merged, or never adapted) is refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class MergeLoraConfig:
    run: str = ""
    """The LoRA adapter directory, or a run directory whose latest checkpoint is an adapter."""
    out: str = ""
    """The checkpoint directory to write (written atomically)."""
    force: bool = False
    """Replace OUT if it already exists."""


def merge_lora_run(cfg: MergeLoraConfig) -> Path:
    from ..checkpoints.io import save_model
    from ..model.lora import is_adapter, load_adapter_model
    if not is_adapter(cfg.run):
        why = "it does not exist" if not Path(cfg.run).exists() else "it has no adapter.json: a plain checkpoint is already merged"
        raise PicochatError(f"{cfg.run} is not a LoRA adapter run ({why}); merge-lora needs the output of LoRA fine-tuning")
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise PicochatError(f"{out} already exists; pass --force to replace it, or choose another OUT")
    if out.resolve() == Path(cfg.run).resolve() or out.resolve() in Path(cfg.run).resolve().parents:
        raise PicochatError(f"OUT {out} would overwrite the adapter run {cfg.run}; choose another directory")
    t0 = time.time()
    model, tokenizer, adir = load_adapter_model(cfg.run)  # base + adapter, merged in fp32
    save_model(model, out, tokenizer)
    print(f"merged {adir} into its base: {model.num_params() / 1e6:.1f}M parameters"
          f"{' (LM head untied from the embedding)' if not model.config.tie_embeddings else ''} -> {out} "
          f"in {time.time() - t0:.1f} s")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model: a plain checkpoint",
                       description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, MergeLoraConfig, positional=("run", "out"))
    p.set_defaults(func=lambda args: merge_lora_run(dataclass_from_args(MergeLoraConfig, args)) and 0)
