"""Hugging Face checkpoints: import GPT-2 / Llama safetensors folders, export picochat models back.

A Hugging Face model folder is ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Both families are points in ModelConfig's space, so importing is
a renaming of tensors with three twists:

* GPT-2 stores its linear layers as ``Conv1D`` with the weight transposed, (in, out) instead of
  nn.Linear's (out, in).
* Llama keeps q/k/v and gate/up as separate matrices; picochat fuses them into one matmul each
  (``qkv_proj`` rows [Q; K; V], ``up_proj`` rows [gate; up]), so they are concatenated along rows.
* With tied embeddings the file usually has no ``lm_head.weight``: the LM head *is* the embedding.

Both directions are driven by one table (``_plan``) of (picochat name, HF names, HF shapes, how),
so import and export cannot drift apart. Only safetensors is read: a user's ``.bin`` file is a
pickle and is never opened.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import PicochatError
from ..fsutil import atomic_write
from ..model.config import ModelConfig
from ..model.gpt import GPT

SUPPORTED = ("gpt2", "llama")

# transformers' class defaults, used when a config.json leaves a field out (as transformers does)
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                       max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False)

# HF activation names <-> picochat's
_GPT2_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# buffers some GPT-2 / Llama files carry that are recomputed, not learned
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# --------------------------------------------------------------------------------------------- config

def _get(cfg: dict, key: str, defaults: dict):
    return cfg[key] if cfg.get(key) is not None else defaults[key]


def _rope_theta(cfg: dict) -> float:
    """RoPE base from a v4 config (top-level rope_theta / rope_scaling) or a v5 one (rope_parameters)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise PicochatError(f"config.json has rope_parameters={params!r}, expected a JSON object; "
                            "fix config.json or re-save the model with transformers")
    if params and not ({"rope_type", "type", "rope_theta", "factor"} & set(params)):
        raise PicochatError("config.json has per-layer RoPE parameters (keys "
                            f"{sorted(params)}); picochat implements one plain RoPE for all layers")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise PicochatError(f"config.json asks for RoPE scaling rope_type={rope_type!r}, which picochat does not "
                            "implement (only plain RoPE, rope_type 'default'); use a model without RoPE scaling")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise PicochatError(f"config.json has partial_rotary_factor={partial}; picochat rotates the whole head "
                            "(factor 1.0) and cannot load this model")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def config_from_hf(hf_config: dict) -> ModelConfig:
    """A transformers config.json (as a dict) -> the equivalent ModelConfig (GPT-2 or Llama)."""
    model_type = hf_config.get("model_type")
    if model_type == "gpt2":
        d = _GPT2_DEFAULTS
        act = _get(hf_config, "activation_function", d)
        if act not in _GPT2_ACT_IN:
            raise PicochatError(f"config.json has activation_function={act!r}, which picochat does not implement; "
                                f"supported: {', '.join(_GPT2_ACT_IN)}")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if _get(hf_config, key, d) != want:
                raise PicochatError(f"config.json has {key}={hf_config[key]}; picochat's GPT-2 needs {key}={want}")
        return ModelConfig(
            vocab_size=_get(hf_config, "vocab_size", d), block_size=_get(hf_config, "n_positions", d),
            n_layer=_get(hf_config, "n_layer", d), n_head=_get(hf_config, "n_head", d),
            n_embd=_get(hf_config, "n_embd", d), ffn_hidden=hf_config.get("n_inner"),
            pos="learned", norm="layernorm", norm_eps=float(_get(hf_config, "layer_norm_epsilon", d)),
            norm_position="pre", activation=_GPT2_ACT_IN[act], bias=True,
            tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", d)), dropout=0.0)
    if model_type == "llama":
        d = _LLAMA_DEFAULTS
        act = _get(hf_config, "hidden_act", d)
        if act not in ("silu", "swish"):
            raise PicochatError(f"config.json has hidden_act={act!r}; picochat's Llama is SwiGLU and needs 'silu'")
        attn_bias, mlp_bias = bool(_get(hf_config, "attention_bias", d)), bool(_get(hf_config, "mlp_bias", d))
        if attn_bias != mlp_bias:
            raise PicochatError(f"config.json has attention_bias={attn_bias} but mlp_bias={mlp_bias}; picochat has "
                                "one bias switch for all linear layers and needs them equal")
        return ModelConfig(
            vocab_size=_get(hf_config, "vocab_size", d), block_size=_get(hf_config, "max_position_embeddings", d),
            n_layer=_get(hf_config, "num_hidden_layers", d), n_head=_get(hf_config, "num_attention_heads", d),
            n_kv_head=hf_config.get("num_key_value_heads"), n_embd=_get(hf_config, "hidden_size", d),
            head_dim=hf_config.get("head_dim"), ffn_hidden=_get(hf_config, "intermediate_size", d),
            pos="rope", rope_base=_rope_theta(hf_config), norm="rmsnorm",
            norm_eps=float(_get(hf_config, "rms_norm_eps", d)), norm_position="pre", activation="swiglu",
            bias=attn_bias, tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", d)), dropout=0.0)
    raise PicochatError(f"model_type {model_type!r} in config.json is not supported for Hugging Face import; "
                        f"supported model types: {', '.join(SUPPORTED)}")


def _family_of(config: ModelConfig) -> str:
    """Which HF family can express this config, or a PicochatError naming the field that stops it."""
    if config.moe_experts:  # exporting one expert, or none, would silently be another model
        raise PicochatError(f"cannot export to Hugging Face: this is a mixture-of-experts model (moe_experts="
                            f"{config.moe_experts}, moe_top_k={config.moe_top_k}) and GPT-2 and Llama have one dense "
                            "feed-forward per block; picochat does not write the Mixtral layout, so keep the "
                            "picochat checkpoint format for this model")
    def need(field, want, family, why=""):
        have = getattr(config, field)
        if have != want:
            raise PicochatError(f"cannot export to Hugging Face {family}: {field}={have!r} but {family} needs "
                                f"{field}={want!r}{why}; change the config or keep the picochat checkpoint format")

    if config.pos == "learned":
        fam = "GPT-2"
        need("norm", "layernorm", fam)
        need("norm_position", "pre", fam)
        need("bias", True, fam, " (GPT-2 has biases in every linear layer and LayerNorm)")
        need("n_kv_head", config.n_head, fam, " (no grouped-query attention)")
        need("head_dim", config.n_embd // config.n_head, fam, " (n_embd // n_head)")
        if config.activation not in _GPT2_ACT_OUT:
            raise PicochatError(f"cannot export to Hugging Face GPT-2: activation={config.activation!r} but GPT-2 "
                                f"needs one of {', '.join(_GPT2_ACT_OUT)}; change the config or keep the picochat format")
        return "gpt2"
    if config.pos == "rope":
        fam = "Llama"
        need("norm", "rmsnorm", fam)
        need("norm_position", "pre", fam)
        need("activation", "swiglu", fam)
        if config.n_embd % config.n_head:
            raise PicochatError(f"cannot export to Hugging Face Llama: n_embd={config.n_embd} is not a multiple of "
                                f"n_head={config.n_head}, which transformers' LlamaConfig requires")
        return "llama"
    raise PicochatError(f"cannot export to Hugging Face: pos={config.pos!r} but GPT-2 needs pos='learned' and "
                        "Llama needs pos='rope'; keep the picochat checkpoint format for this model")


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """ModelConfig -> a transformers config.json dict (GPT-2 or Llama), or PicochatError."""
    family = _family_of(config)
    dtype_name = str(dtype).removeprefix("torch.")
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": config.ffn_hidden,
            "activation_function": _GPT2_ACT_OUT[config.activation], "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "initializer_range": config.init_std, "scale_attn_weights": True,
            "tie_word_embeddings": config.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
            "dtype": dtype_name,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters, transformers 4 reads rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_theta": config.rope_base, "attention_bias": config.bias, "mlp_bias": config.bias,
        "attention_dropout": config.dropout, "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
        "dtype": dtype_name,
    }


# ------------------------------------------------------------------------------------------ tensors

@dataclass
class _Entry:
    pico: str                       # picochat state-dict name
    hf: list[str]                   # HF names without the "transformer." / "model." prefix
    shapes: list[tuple[int, ...]]   # HF shape of each
    how: str                        # "copy", "transpose" (Conv1D) or "cat" (rows concatenated)


def _plan(config: ModelConfig, model_type: str) -> list[_Entry]:
    """Every tensor of the picochat model and the HF tensors it is made of (tied lm_head excluded)."""
    d, V, hd, h = config.n_embd, config.vocab_size, config.head_dim, config.ffn_hidden
    nq, nkv = config.n_head * hd, config.n_kv_head * hd
    plan: list[_Entry] = []

    def add(pico, hf, shapes, how="copy"):
        hf = [hf] if isinstance(hf, str) else hf
        shapes = [shapes] if isinstance(shapes[0], int) else shapes
        plan.append(_Entry(pico, hf, [tuple(s) for s in shapes], how))

    if model_type == "gpt2":
        add("tok_emb.weight", "wte.weight", (V, d))
        add("pos_emb.weight", "wpe.weight", (config.block_size, d))
        for i in range(config.n_layer):
            p, q = f"blocks.{i}.", f"h.{i}."
            for pn, hn in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                add(p + pn + ".weight", q + hn + ".weight", (d,))
                add(p + pn + ".bias", q + hn + ".bias", (d,))
            for pn, hn, n_in, n_out in (("attn.qkv_proj", "attn.c_attn", d, nq + 2 * nkv),
                                        ("attn.o_proj", "attn.c_proj", nq, d),
                                        ("ffn.up_proj", "mlp.c_fc", d, h),
                                        ("ffn.down_proj", "mlp.c_proj", h, d)):
                add(p + pn + ".weight", q + hn + ".weight", (n_in, n_out), "transpose")
                add(p + pn + ".bias", q + hn + ".bias", (n_out,))
        add("final_norm.weight", "ln_f.weight", (d,))
        add("final_norm.bias", "ln_f.bias", (d,))
    elif model_type == "llama":
        add("tok_emb.weight", "embed_tokens.weight", (V, d))
        for i in range(config.n_layer):
            p, q = f"blocks.{i}.", f"layers.{i}."
            add(p + "attn_norm.weight", q + "input_layernorm.weight", (d,))
            add(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", (d,))
            a, m = q + "self_attn.", q + "mlp."
            add(p + "attn.qkv_proj.weight", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                [(nq, d), (nkv, d), (nkv, d)], "cat")
            add(p + "attn.o_proj.weight", a + "o_proj.weight", (d, nq))
            add(p + "ffn.up_proj.weight", [m + "gate_proj.weight", m + "up_proj.weight"], [(h, d), (h, d)], "cat")
            add(p + "ffn.down_proj.weight", m + "down_proj.weight", (d, h))
            if config.bias:
                add(p + "attn.qkv_proj.bias", [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"],
                    [(nq,), (nkv,), (nkv,)], "cat")
                add(p + "attn.o_proj.bias", a + "o_proj.bias", (d,))
                add(p + "ffn.up_proj.bias", [m + "gate_proj.bias", m + "up_proj.bias"], [(h,), (h,)], "cat")
                add(p + "ffn.down_proj.bias", m + "down_proj.bias", (d,))
        add("final_norm.weight", "norm.weight", (d,))
    else:
        raise PicochatError(f"model_type {model_type!r} is not supported for Hugging Face weights; "
                            f"supported model types: {', '.join(SUPPORTED)}")
    if not config.tie_embeddings:
        add("lm_head.weight", "lm_head.weight", (V, d))
    return plan


def _prefix(model_type: str) -> str:
    return "transformer." if model_type == "gpt2" else "model."


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict:
    """HF tensors (names as in the file) -> a picochat GPT state dict for ``config`` (strict-loadable).

    Accepts names with or without the ``transformer.`` / ``model.`` prefix (LMHead model or bare model).
    Missing, unexpected or wrongly shaped tensors raise PicochatError naming the tensor.
    """
    prefix = _prefix(model_type) if model_type in SUPPORTED else ""
    plan = _plan(config, model_type)
    # normalised name (no prefix) -> name in the file, so messages quote the file's own names
    original: dict[str, str] = {}
    for name in hf_state:
        norm = name[len(prefix):] if prefix and name.startswith(prefix) else name
        if norm in original:
            raise PicochatError(f"tensor {name!r} appears twice in the checkpoint (with and without the "
                                f"{prefix!r} prefix); remove one copy")
        original[norm] = name

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for e in plan:
        parts = []
        for hf_name, want in zip(e.hf, e.shapes):
            if hf_name not in original:
                shown = hf_name if hf_name == "lm_head.weight" else prefix + hf_name
                raise PicochatError(f"tensor {shown!r} is missing from the checkpoint (expected shape {list(want)} "
                                    "for this config.json); the safetensors file is incomplete or belongs to another model")
            t = hf_state[original[hf_name]]
            if tuple(t.shape) != want:
                raise PicochatError(f"tensor {original[hf_name]!r} has shape {list(t.shape)} in the checkpoint but "
                                    f"config.json implies {list(want)}; the weights and config.json do not match")
            used.add(hf_name)
            parts.append(t)
        if e.how == "transpose":
            out[e.pico] = parts[0].t().contiguous()
        elif e.how == "cat":
            out[e.pico] = torch.cat(parts, dim=0)
        else:
            out[e.pico] = parts[0]
    if config.tie_embeddings:
        used.add("lm_head.weight")  # a tied file may still carry a copy: the embedding wins, as in transformers
        out["lm_head.weight"] = out["tok_emb.weight"]
    unexpected = sorted(original[n] for n in original if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise PicochatError(f"unexpected tensors in the checkpoint: {', '.join(unexpected[:5])}{more}; "
                            f"config.json does not describe these weights ({model_type}, {config.n_layer} layers, "
                            f"tie_word_embeddings={config.tie_embeddings})")
    return out


def state_dict_to_hf(model_state: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict:
    """The inverse of state_dict_from_hf: picochat tensors -> HF LMHead-model names (owned, contiguous)."""
    prefix = _prefix(model_type)
    out: dict[str, torch.Tensor] = {}
    for e in _plan(config, model_type):
        t = model_state[e.pico].detach()
        if e.how == "transpose":
            pieces = [t.t()]
        elif e.how == "cat":
            pieces = t.split([s[0] for s in e.shapes], dim=0)
        else:
            pieces = [t]
        for hf_name, piece in zip(e.hf, pieces):
            name = hf_name if hf_name == "lm_head.weight" else prefix + hf_name
            out[name] = piece.contiguous().clone()  # own storage: safetensors refuses shared tensors
    return out


# ------------------------------------------------------------------------------------------ files

def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PicochatError(f"cannot read {path}: {exc}; the file is corrupt or not safetensors") from None


def _load_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PicochatError(f"{index} is not a valid safetensors index ({exc}); re-save the model") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise PicochatError(f"{index} points outside its folder ({shard!r}); refusing to read it")
            if not (folder / shard).is_file():
                raise PicochatError(f"shard {shard} listed in {index.name} is missing from {folder}; "
                                    "copy the complete model folder")
            state.update(_read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise PicochatError(f"tensor {missing[0]!r} is listed in {index.name} but absent from its shard "
                                f"{weight_map[missing[0]]}; the shard is incomplete")
        return state
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise PicochatError(f"{folder} has only pickle weights (.bin/.pt), which picochat never opens; convert "
                            "them to model.safetensors (e.g. save_pretrained(..., safe_serialization=True))")
    raise PicochatError(f"{folder} has no model.safetensors or model.safetensors.index.json; "
                        "point at a Hugging Face model folder")


def read_hf_config(path: Union[str, os.PathLike]) -> dict:
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise PicochatError(f"{folder} is not a directory; point at a Hugging Face model folder "
                            "(config.json + model.safetensors)")
    if not cfg_path.is_file():
        raise PicochatError(f"{folder} has no config.json; point at a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PicochatError(f"{cfg_path} is not valid JSON ({exc}); fix or re-download the file") from None
    if not isinstance(cfg, dict):
        raise PicochatError(f"{cfg_path} must hold a JSON object; fix or re-download the file")
    return cfg


def load_hf(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> GPT:
    """A Hugging Face GPT-2 / Llama folder -> a picochat GPT in eval mode (fp32 unless ``dtype``)."""
    hf_config = read_hf_config(path)
    config = config_from_hf(hf_config)
    tensors = _load_hf_tensors(Path(path))
    state = state_dict_from_hf(tensors, config, hf_config["model_type"])
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def export_hf(model: GPT, out_dir: Union[str, os.PathLike], extra_config: Optional[dict] = None) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads. ``extra_config`` is merged
    into config.json (e.g. bos_token_id / eos_token_id from the tokenizer). Returns the folder."""
    from safetensors.torch import save

    config = model.config
    model_type = _family_of(config)  # refuses configs neither family can express, naming the field
    dtype = model.tok_emb.weight.dtype
    hf_config = {**config_to_hf(config, dtype), **(extra_config or {})}
    tensors = state_dict_to_hf({k: v.cpu() for k, v in model.state_dict().items()}, config, model_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out
