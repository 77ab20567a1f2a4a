"""LoRA: fine-tune a frozen model through small low-rank updates of chosen weight matrices (Hu et al. 2021).

    W' = W + (alpha / r) B A         W: (d_out, d_in) frozen;  A: (r, d_in);  B: (d_out, r);  r << d
    y  = x W^T + b + (alpha / r) * dropout(x) A^T B^T      (dropout on the adapter's input only)

A starts Kaiming-uniform (as in Microsoft's loralib and PEFT), B starts at zero, so B A = 0: the adapted
model equals the base model exactly until the first optimizer step. Only A and B train (every other
parameter gets requires_grad=False), and only they are saved: r (d_in + d_out) numbers per matrix
instead of d_in d_out. After training, merge_lora folds (alpha/r) B A into W and the model is a plain
GPT again, with no extra cost per token.

Target names (the names users give, mapped onto picochat's GPT, whose Q/K/V and SwiGLU gate/up
matrices are fused into one Linear each for speed):

    q, k, v   the query / key / value rows of attn.qkv_proj (each gets its own A and B, exactly as
              LoRA on separate q_proj / k_proj / v_proj layers would, e.g. in Llama + PEFT)
    o         attn.o_proj, the attention output projection
    gate      SwiGLU only: the gate rows of ffn.up_proj (W_gate in SiLU(W_gate x) * W_up x)
    up        SwiGLU: the up rows of ffn.up_proj; GELU/ReLU FFNs: the whole first matrix ffn.up_proj
    down      ffn.down_proj, the FFN's second matrix
    lm_head   the unembedding (vocab x d). With tied embeddings only the head is adapted; the input
              embedding stays as it is. Merging then unties them: the merged model stores its own
              lm_head (tie_embeddings=False), since E + (alpha/r) B A is no longer E.

    model = GPT(config); load weights ...
    add_lora(model, LoraConfig(rank=8, alpha=16, targets=("q", "v")))   # train: only A, B have grads
    save_adapter(model, cfg, "runs/sft", base="smollm2", tokenizer=tok) # a small file + a reference to the base
    model, tok, _ = load_adapter_model("runs/sft")                      # base + adapter, merged
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError
from .layers import Linear

ADAPTER_FORMAT, ADAPTER_VERSION = "picochat-lora", 1
ADAPTER_JSON, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


@dataclass
class LoraConfig:
    rank: int = 8
    """r: the rank of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (so changing r does not change the step size much)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the frozen path sees x unchanged)."""
    targets: tuple[str, ...] = field(default=("q", "k", "v", "o"))
    """Which matrices to adapt: q,k,v,o,gate,up,down,lm_head (a tuple, a list, or one comma-separated string)."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(dict.fromkeys(self.targets))  # keep the order, drop repeats
        if not self.targets:
            raise PicochatError(f"LoRA needs at least one target; choose from {','.join(ALL_TARGETS)}")
        if int(self.rank) != self.rank or self.rank < 1:
            raise PicochatError(f"--lora-rank must be a positive integer, got {self.rank}")
        self.rank = int(self.rank)
        if not self.alpha > 0:
            raise PicochatError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise PicochatError(f"--lora-dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(Linear):
    """picochat's Linear (same weight and bias objects, same state-dict names, same oneDNN forward) plus
    low-rank updates on row ranges of W: one (A, B) pair per named slice, e.g. q, k, v of a fused qkv_proj.

    State-dict names: ``<layer>.weight`` (frozen, unchanged), ``<layer>.lora_A.<name>``, ``<layer>.lora_B.<name>``.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], cfg: LoraConfig):
        nn.Module.__init__(self)  # not Linear.__init__: keep the base's tensors (a tied head stays tied)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1][0]))  # name -> (row start, row end)
        self.rank, self.scaling = cfg.rank, cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(cfg.rank, self.in_features, **kw))
                                        for n in self.slices})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(end - start, cfg.rank, **kw))
                                        for n, (start, end) in self.slices.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.rank} scaling={self.scaling:g} on {','.join(self.slices)}"

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha/r) B A for one slice: the (end - start, d_in) update of W's rows, in fp32."""
        return self.scaling * (self.lora_B[name].float() @ self.lora_A[name].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # the frozen path: x W^T + b
        h = self.lora_dropout(x)
        parts, pos = [], 0
        for name, (start, end) in self.slices.items():
            d = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scaling
            if start == 0 and end == self.out_features:
                return y + d  # the whole matrix: no slicing needed
            if start > pos:
                parts.append(y[..., pos:start])
            parts.append(y[..., start:end] + d)
            pos = end
        if pos < self.out_features:
            parts.append(y[..., pos:])
        return torch.cat(parts, dim=-1)


def target_map(config) -> dict[str, tuple[str, int, int]]:
    """{user name: (module path inside a Block or the GPT, row start, row end)} for this model's config."""
    nh, nkv, hd, d, h = config.n_head, config.n_kv_head, config.head_dim, config.n_embd, config.ffn_hidden
    m = {"q": ("attn.qkv_proj", 0, nh * hd),
         "k": ("attn.qkv_proj", nh * hd, (nh + nkv) * hd),
         "v": ("attn.qkv_proj", (nh + nkv) * hd, (nh + 2 * nkv) * hd),
         "o": ("attn.o_proj", 0, d)}
    if config.activation == "swiglu":  # up_proj rows: gate, then up
        m["gate"] = ("ffn.up_proj", 0, h)
        m["up"] = ("ffn.up_proj", h, 2 * h)
    else:
        m["up"] = ("ffn.up_proj", 0, h)
    m["down"] = ("ffn.down_proj", 0, d)
    m["lm_head"] = ("lm_head", 0, config.vocab_size)
    return m


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def add_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target Linear layers of a GPT in place and freeze every other parameter.

    Returns the wrapped modules' names (e.g. ``blocks.0.attn.qkv_proj``)."""
    from .quant import is_quantized
    if is_quantized(model):
        raise PicochatError("LoRA cannot train an int8-quantized model; load it without --quantize")
    if has_lora(model):
        raise PicochatError("this model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    tmap = target_map(model.config)
    ffn_targets = [t for t in cfg.targets if t in ("gate", "up", "down")]
    if model.config.moe_experts and ffn_targets:  # the block's ffn is N experts and a router, not one Linear pair
        raise PicochatError(f"LoRA target(s) {','.join(ffn_targets)} are feed-forward matrices, and this is a "
                            f"mixture-of-experts model (moe_experts={model.config.moe_experts}) whose feed-forward "
                            "is several experts; picochat's LoRA does not wrap experts: use q,k,v,o and/or lm_head")
    unknown = [t for t in cfg.targets if t not in tmap]
    if unknown:
        raise PicochatError(f"unknown LoRA target(s) {','.join(unknown)} for this model "
                            f"({model.config.activation} FFN); valid targets: {','.join(tmap)}")
    per_module: dict[str, dict[str, tuple[int, int]]] = {}  # module path -> {target name: rows}
    for t in cfg.targets:
        path, start, end = tmap[t]
        prefixes = [""] if path == "lm_head" else [f"blocks.{i}." for i in range(len(model.blocks))]
        for p in prefixes:
            per_module.setdefault(p + path, {})[t] = (start, end)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, slices in per_module.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise PicochatError(f"LoRA expected a Linear at {name}, found {type(base).__name__}")
        setattr(parent, child, LoraLinear(base, slices, cfg))
    return list(per_module)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: {'blocks.0.attn.qkv_proj.lora_A.q': A, ...}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that add_lora prepared; strict on names and shapes."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PicochatError(f"the adapter does not match this model's LoRA layers: missing {missing[:3]}"
                            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                            f"{'...' if len(unexpected) > 3 else ''} (other targets or another base?)")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise PicochatError(f"adapter tensor {k} has shape {tuple(state[k].shape)} but the model expects "
                                f"{tuple(v.shape)}: another rank or another base model")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W <- W + (alpha/r) B A for every adapter, then put plain Linears back and unfreeze all parameters.

    A tied LM head with an adapter is untied: it gets its own weight E + (alpha/r) B A and the model's
    config says tie_embeddings=False (the input embedding keeps E)."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    if not wrapped:
        raise PicochatError("nothing to merge: this model is already merged / has no adapters")
    tied = getattr(model, "config", None) is not None and model.config.tie_embeddings
    for name, m in wrapped:
        weight = m.weight
        if tied and name == "lm_head":
            weight = nn.Parameter(weight.detach().clone())  # untie: the embedding keeps E
        for s, (start, end) in m.slices.items():
            weight[start:end] += m.delta_weight(s).to(weight.dtype)
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        if tied and name == "lm_head":
            model.config = replace(model.config, tie_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(True)


# ---- adapter files -------------------------------------------------------------------------------

def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir, base: str, tokenizer=None,
                 extra_files: Optional[dict] = None) -> Path:
    """Write adapter.safetensors + adapter.json (+ tokenizer.json, + extra {name: bytes|callable(path)},
    as checkpoints.io.save_model takes them) as one atomic directory.

    base: the base model as the user named it (``smollm2``, a .gguf file, a checkpoint or run dir);
    a path is also recorded absolute, so the adapter still loads from another working directory."""
    from safetensors.torch import save_file
    from ..fsutil import atomic_dir
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise PicochatError("this model has no LoRA adapters to save (call add_lora first)")
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "base": str(base),
            "lora": {**asdict(cfg), "targets": list(cfg.targets)}, "base_config": model.config.to_dict()}
    if Path(str(base)).exists():
        meta["base_path"] = str(Path(str(base)).resolve())
    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_JSON).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
    return atomic_dir(out_dir, fill, extra_files)


def _adapter_dir(path) -> Optional[Path]:
    """The directory holding adapter.json: `path` itself, or the checkpoint a run dir's ``latest`` names."""
    try:
        p = Path(path)
        if (p / ADAPTER_JSON).is_file():
            return p
        if (p / "latest").is_file():
            target = p / (p / "latest").read_text().strip()
            if (target / ADAPTER_JSON).is_file():
                return target
    except (OSError, ValueError, TypeError):
        pass
    return None


def is_adapter(path) -> bool:
    """True for an adapter directory, or a run directory whose latest checkpoint is one."""
    return _adapter_dir(path) is not None


def read_adapter_meta(adapter_dir: Path) -> dict:
    try:
        meta = json.loads((adapter_dir / ADAPTER_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"{adapter_dir}/{ADAPTER_JSON} is unreadable or corrupt ({e})")
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise PicochatError(f"{adapter_dir}/{ADAPTER_JSON} is not a picochat LoRA adapter")
    if meta.get("version", 0) > ADAPTER_VERSION:
        raise PicochatError(f"{adapter_dir} was written by a newer picochat (adapter v{meta['version']}); upgrade picochat")
    for key in ("base", "lora", "base_config"):
        if key not in meta:
            raise PicochatError(f"{adapter_dir}/{ADAPTER_JSON} lacks {key!r}; the adapter is incomplete")
    return meta


def load_adapter_model(path, device="cpu", dtype=None, quantize=None):
    """-> (GPT with the adapter merged in, in eval mode; tokenizer; adapter dir).

    Loads the base named in adapter.json (fp32, on the CPU), checks it is the model the adapter was
    trained on, adds LoRA, loads the adapter, merges it, and only then casts / quantizes."""
    from ..checkpoints.io import load_model, load_state, place_model, read_tokenizer
    adir = _adapter_dir(path)
    if adir is None:
        raise PicochatError(f"{path} is not a LoRA adapter (no {ADAPTER_JSON})")
    meta = read_adapter_meta(adir)
    base = meta["base"]
    if not Path(base).exists() and meta.get("base_path") and Path(meta["base_path"]).exists():
        base = meta["base_path"]  # saved with a relative path, loaded from elsewhere
    if _adapter_dir(base) == adir:
        raise PicochatError(f"the adapter at {adir} names itself as its base model")
    try:
        model, base_tok, _ = load_model(base)
    except PicochatError as e:
        raise PicochatError(f"the LoRA adapter at {adir} needs its base model {meta['base']!r}: {e}") from None
    if model.config.to_dict() != meta["base_config"]:
        diff = sorted(k for k, v in model.config.to_dict().items() if meta["base_config"].get(k) != v)
        raise PicochatError(f"the base model {meta['base']!r} is not the one the adapter at {adir} was trained "
                            f"on (config differs in {', '.join(diff) or 'its fields'})")
    cfg = LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})
    add_lora(model, cfg)
    load_lora_state(model, load_state(adir / ADAPTER_WEIGHTS))
    merge_lora(model)
    tokenizer = read_tokenizer(adir, base_tok)
    return place_model(model, device, dtype, quantize, tokenizer), tokenizer, adir


def save_trained(model, lora: Optional[LoraConfig], out_dir, *, base: str, tokenizer, extra_files: dict) -> None:
    """A training checkpoint of `model`: the whole model, or for a LoRA run its adapters and a reference
    to the base (the stages' Trainer hooks share this, and load_trained)."""
    from ..checkpoints.io import save_model
    if lora is None:
        save_model(model, out_dir, tokenizer, extra_files)
    else:
        save_adapter(model, lora, out_dir, base=base, tokenizer=tokenizer, extra_files=extra_files)


def load_trained(model, lora: Optional[LoraConfig], ckpt: Path) -> None:
    """Read what save_trained wrote back into `model` (LoRA already added for a LoRA run)."""
    from ..checkpoints.io import load_state, load_weights_into
    if lora is None:
        load_weights_into(model, load_state(ckpt / "model.safetensors"), str(ckpt))
    else:
        load_lora_state(model, load_state(ckpt / ADAPTER_WEIGHTS))
