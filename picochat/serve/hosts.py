"""A loaded model behind the server: weights, tokenizer, chat template and its own scheduler thread;
for a model that sees (`picochat vlm train`), the image encoder beside its GPT."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import PicochatError

@dataclass
class ModelHost:
    id: str
    model: object
    tokenizer: object
    scheduler: object
    template: Optional[str]          # None: not a chat model (only /v1/completions)
    default_system: Optional[str]
    stop_ids: tuple[int, ...]        # end of an assistant turn
    created: int
    max_request_tokens: int = 8192   # n x max_tokens of one request: one client cannot book every slot
    vision: Optional[object] = None  # the ImageEncoder (checkpoints/vlm.py) of a model that sees, else None
    image_id: Optional[int] = None   # its <|image|> token

    @property
    def context(self) -> int:
        return self.scheduler.context

    @property
    def image_tokens(self) -> Optional[int]:
        """N: the tokens one picture takes in the conversation (None: the model cannot see)."""
        return self.vision.n_tokens if self.vision is not None else None

    @property
    def image_size(self) -> Optional[int]:
        """The side in pixels every picture is shrunk to before the model reads it."""
        return self.vision.config.vit_config().image_size if self.vision is not None else None

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: names the backend configuration (model, weights' dtype, width of the
        batch, context, how seeds become tokens), so a client can tell when the same seed may no longer give
        the same answer."""
        from ..engine.sampling import SAMPLER_VERSION
        p = next(self.model.parameters())
        cfg = f"{self.id}|{p.dtype}|{type(self.model).__name__}|{self.scheduler.max_batch}|{self.context}"
        cfg += f"|sampler{SAMPLER_VERSION}"
        return "fp_" + hashlib.blake2b(cfg.encode(), digest_size=5).hexdigest()

    def card(self) -> dict:
        sees = {"image_tokens": self.image_tokens, "image_size": self.image_size} if self.vision is not None else {}
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "picochat",
                "type": "chat" if self.template is not None else "completion",
                "context_length": self.context, "chat": self.template is not None,
                "vision": self.vision is not None, **sees}


def model_id(spec: str) -> str:
    p = Path(spec)
    if p.suffix == ".gguf":
        return p.stem
    return p.name if (p.exists() or "/" in spec) else spec


def load_host(spec: str, *, dtype: str = "auto", max_batch: int = 16, max_queue: int = 64,
              max_context: Optional[int] = 4096, quantize: Optional[str] = None,
              name: Optional[str] = None, retain_prefixes: bool = True,
              max_request_tokens: int = 8192, fast: str = "auto") -> ModelHost:
    """Load `spec` (smollm2, a .gguf file or a picochat checkpoint, with its image encoder if it has one); the
    app's lifespan starts its scheduler. retain_prefixes=False: no request's K/V outlive it (prompt caching
    across requests off)."""
    from ..chat_template import default_system_prompt, pick_template, stop_token_ids
    from ..checkpoints.gguf import gguf_source
    from ..checkpoints.io import load_model
    from ..checkpoints.vlm import image_token_id, load_image_encoder
    from ..device import pick_device, pick_dtype
    from ..engine.model_thread import ModelThread
    from ..engine.scheduler import Scheduler
    device = pick_device("auto")
    worker = ModelThread(f"picochat-{name or model_id(spec)}")  # loads the model, then runs its scheduler
    model, tokenizer, _ = worker.call(
        lambda: load_model(spec, device=device, dtype=pick_dtype(dtype, device, quantize), quantize=quantize))
    if tokenizer is None:
        raise PicochatError(f"{spec} has no tokenizer.json; the server needs one to read and write text")
    model.eval()  # (no grad: the scheduler thread turns autograd off for itself)
    # fp32 whatever --dtype says (it is small; its embeddings are cast to the GPT's dtype where they are
    # placed), so a picture's embeddings equal `picochat chat --image`'s
    vision = worker.call(lambda: load_image_encoder(spec, device=device))
    image_id = image_token_id(tokenizer, vision) if vision is not None else None
    try:
        template = pick_template(tokenizer)
    except PicochatError:
        template = None
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    stops = stop_token_ids(tokenizer, template) if template else ((eot,) if eot is not None else ())
    default_system = default_system_prompt(tokenizer, from_gguf=gguf_source(spec) is not None)
    sched = worker.call(lambda: Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                                          max_context=max_context, worker=worker,
                                          retain_prefixes=retain_prefixes, fast=fast))  # its cache: same thread
    return ModelHost(name or model_id(spec), model, tokenizer, sched, template, default_system, stops,
                     int(time.time()), max_request_tokens, vision, image_id)
