"""Attention maps of every model kind, as one shape a plot, a web page or the API can draw.

For a layer l and head h the map is the matrix the forward pass multiplies V by:

    A = softmax(Q K^T / sqrt(d_k) + M)        (T_q, T_k), each row a distribution over the keys

with M = -inf where the mask forbids (a future token in a GPT, padding in an encoder), so those entries
are exactly 0. The models hand A back from the textbook path of `model/attention.py` (return_weights);
the fast SDPA path they use otherwise computes the same A without keeping it (tests/inspect check that
the layer outputs agree).

    GPT          "self":    (L, H, T, T), causal
    BERT         "self":    (L, H, T, T), every real token
    seq2seq      "encoder": (L, H, S, S); "decoder": (L, H, T, T) causal; "cross": (L, H, T, S)
    ViT          "self":    (L, H, 1 + N, 1 + N) over [CLS] and the N patches (image: the patch grid)
    VLM          "self":    a GPT's, its pictures' N image tokens among the tokens (pictures: where each sits)

A chat model that sees reads each picture as N vectors placed at N <|image|> marker tokens (engine
PromptEmbeds); its maps are taken with the very same vectors in place, so a token's row says how much it
looked at each of the picture's sqrt(N) x sqrt(N) cells (inspect/pictures.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import PicochatError

MAX_TOKENS = 512  # one map is (L, H, T, T) floats: SmolLM2 at 512 tokens is 30 x 9 x 512^2 x 4 B = 280 MB


@dataclass
class MapGroup:
    """One family of maps: query tokens (rows), key tokens (columns), weights (L, H, T_q, T_k)."""
    queries: list[str]
    keys: list[str]
    weights: torch.Tensor
    causal: bool = False

    def mean_heads(self) -> torch.Tensor:
        return self.weights.mean(1)  # (L, T_q, T_k)


@dataclass
class AttentionView:
    kind: str                      # gpt | bert | seq2seq | vit
    title: str
    groups: dict[str, MapGroup]
    image: Optional[dict] = None   # vit: {"pixels": (H, W) floats 0..1, "grid": (rows, cols)}
    meta: dict = field(default_factory=dict)
    pictures: list[dict] = field(default_factory=list)  # a VLM's: picture_runs (+ what shows each picture)
    answer_start: Optional[int] = None  # a chat answer's first token (the viewer starts there)

    def to_json(self, decimals: int = 4) -> dict:
        """Plain lists for JSON: weights rounded (4 decimals keep every visible shade and the zeros exact)."""
        out = {"kind": self.kind, "title": self.title, "meta": self.meta, "image": self.image,
               "pictures": self.pictures,
               "groups": {name: {"queries": g.queries, "keys": g.keys, "causal": g.causal,
                                 "layers": g.weights.size(0), "heads": g.weights.size(1),
                                 "weights": torch.round(g.weights, decimals=decimals).tolist()}
                          for name, g in self.groups.items()}}
        if self.answer_start is not None:
            out["answer_start"] = self.answer_start
        return out


def _stack(maps: list) -> torch.Tensor:
    """Per-layer (1, H, T_q, T_k) maps of batch row 0 -> (L, H, T_q, T_k) float32."""
    if not maps or any(m is None for m in maps):
        raise PicochatError("the model did not return its attention weights (was return_weights passed down?)")
    return torch.stack([m[0].float().cpu() for m in maps])


def _check_len(n: int, what: str) -> None:
    if n > MAX_TOKENS:
        raise PicochatError(f"{what} is {n} tokens; attention maps are drawn for at most {MAX_TOKENS} "
                            "(a map is layers x heads x tokens^2 numbers): shorten it")
    if n == 0:
        raise PicochatError(f"{what} is empty; give some text")


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """How each token reads: its bytes as text (a piece of a multi-byte character shows as U+FFFD)."""
    return [tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]


def picture_runs(ids: list[int], marker_id: int, n_tokens: int) -> list[dict]:
    """Where each picture's image tokens sit in ids: [{"index": 1, 2, ..., "first_token", "n_tokens",
    "grid": [rows, cols]}], a run of k * N markers being k pictures side by side. The N tokens of a
    picture are a sqrt(N) x sqrt(N) grid over it in raster order (model/multimodal.py)."""
    side = int(round(n_tokens ** 0.5))
    if n_tokens < 1 or side * side != n_tokens:
        raise PicochatError(f"{n_tokens} image tokens per picture are not a square grid; this checkpoint's image "
                            "encoder is not one picochat draws")
    out, i = [], 0
    while i < len(ids):
        if ids[i] != marker_id:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == marker_id:
            j += 1
        if (j - i) % n_tokens:
            raise PicochatError(f"a run of {j - i} image markers at token {i} is not a whole number of pictures of "
                                f"{n_tokens} tokens: the text itself holds the marker token")
        for start in range(i, j, n_tokens):
            out.append({"index": len(out) + 1, "first_token": start, "n_tokens": n_tokens, "grid": [side, side]})
        i = j
    return out


def picture_token_names(names: list[str], pictures: list[dict]) -> list[str]:
    """names with each image token renamed "<imagek:rRcC>" (row R, column C of picture k's grid): no spaces,
    which a viewer shows as dots, and short enough for the 18 characters a heatmap's label keeps."""
    out = list(names)
    for p in pictures:
        cols = p["grid"][1]
        for n in range(p["n_tokens"]):
            out[p["first_token"] + n] = f"<image{p['index']}:r{n // cols}c{n % cols}>"
    return out


@torch.no_grad()
def gpt_maps(model, tokenizer, ids: list[int], title: str = "", embeds=None,
             pictures: Optional[list[dict]] = None) -> AttentionView:
    """A decoder's causal self-attention over ids (a prompt and, for a chat answer, the answer after it).

    embeds (engine.PromptEmbeds): vectors read at some positions instead of their tokens' embeddings, as
    generation places a picture's; without them a VLM's maps would be those of its bare marker tokens,
    not of what it saw. pictures (picture_runs of ids): their tokens are named by picture and grid cell."""
    _check_len(len(ids), "the text")
    if len(ids) > model.config.block_size:
        raise PicochatError(f"the text is {len(ids)} tokens but the model reads at most {model.config.block_size}")
    model.eval()
    device = next(model.parameters()).device
    placed = embeds.window(0, len(ids), device) if embeds is not None else {}  # GPT.forward's embeds, embeds_mask
    try:
        model(torch.tensor([ids], device=device), return_attention=True, last_logits_only=True, **placed)
        w = _stack(model.attention_maps())
    finally:
        for b in model.blocks:  # (B, nh, T, T) per layer: do not keep hundreds of MB alive on the model
            b.attn.last_weights = None
    toks = picture_token_names(token_strings(tokenizer, ids), pictures or [])
    return AttentionView("gpt", title, {"self": MapGroup(toks, toks, w, causal=True)},
                         pictures=[dict(p) for p in pictures or []])


@torch.no_grad()
def bert_maps(encoder, text: str, title: str = "") -> AttentionView:
    """An encoder's bidirectional self-attention over [CLS] text [SEP] (encoder: encoder.embeddings.Encoder)."""
    ids = encoder.encode([text])[0]  # [CLS] ... [SEP]
    encoder.check_lengths([ids], "the text")
    _check_len(len(ids), "the text")
    model = encoder.model
    bert = getattr(model, "encoder", model)  # a BertForTask's encoder, or the bare BertEncoder
    bert.eval()
    try:
        bert(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), return_attention=True)
        w = _stack(bert.attention_maps())
    finally:
        for b in bert.blocks:
            b.attn.last_weights = None
    toks = [encoder.tokenizer.id_to_token(i) for i in ids]
    return AttentionView("bert", title, {"self": MapGroup(toks, toks, w)})


@torch.no_grad()
def seq2seq_maps(model, vocabs, text: str, title: str = "") -> AttentionView:
    """Translate text greedily, then re-read source and output with the maps on (teacher forcing on the
    model's own words gives the very steps greedy decoding took, all at once)."""
    from ..translate.data import BOS, EOS, source_words
    from ..translate.evaluate import encode_sources
    if not text.strip():
        raise PicochatError("the text is empty; give English number words, e.g. \"twenty-one\"")
    src = encode_sources(vocabs, [text], "cpu")
    out = model.greedy(src)[0]
    tgt = torch.tensor([[vocabs.target.stoi[BOS]] + out + [vocabs.target.stoi[EOS]]])
    model.eval()
    model(src, tgt, return_weights=True)
    maps = model.attention_maps()
    for blk in list(model.encoder) + list(model.decoder):
        for m in (getattr(blk, "attn", None), getattr(blk, "self_attn", None), getattr(blk, "cross_attn", None)):
            if m is not None:
                m.last_weights = None
    s = source_words(text) + [EOS]
    t = [BOS] + vocabs.target.decode(out)  # the decoder's inputs: row i predicts word i + 1
    return AttentionView("seq2seq", title, {
        "encoder": MapGroup(s, s, _stack(maps["encoder"])),
        "decoder": MapGroup(t, t, _stack(maps["decoder"]), causal=True),
        "cross": MapGroup(t, s, _stack(maps["cross"]))},
        meta={"translation": " ".join(vocabs.target.decode(out))})


def model_kind(spec: str) -> str:
    """gpt, bert, seq2seq or vit, from a checkpoint's config.json (a run folder follows `latest`)."""
    from ..encoder.embeddings import is_encoder_spec
    if is_encoder_spec(spec):
        return "bert"
    p = Path(spec)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    try:
        fmt = json.loads((p / "config.json").read_text("utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    return {"picochat-seq2seq": "seq2seq", "picochat-vit": "vit"}.get(fmt, "gpt")


def maps_for(spec: str, text: str, image: Optional[str] = None, answer_tokens: int = 24) -> AttentionView:
    """Load spec (any model picochat reads) and return its maps for text (vit: text is an image path).
    image: a picture file a chat model that sees is asked about (text is the question; it answers first,
    in at most answer_tokens tokens: inspect/pictures.py)."""
    kind = model_kind(spec)
    title = f"{Path(spec).name or spec}"
    if image is not None and kind != "gpt":
        fix = (f"give the image as the text: picochat attention {spec} {image}" if kind == "vit" else
               "--image needs a chat model that sees (from `picochat vlm train`), or leave --image out")
        raise PicochatError(f"{spec} is a {kind} model, which reads no pictures beside a text; {fix}")
    if kind == "bert":
        from ..encoder.embeddings import load_encoder
        return bert_maps(load_encoder(spec), text, title)
    if kind == "seq2seq":
        from ..translate.train import load_translator
        model, vocabs, _ = load_translator(spec)
        return seq2seq_maps(model, vocabs, text, title)
    if kind == "vit":
        from ..vision.maps import vit_maps_for
        return vit_maps_for(spec, text, title)
    if image is not None:
        from .pictures import vlm_maps_for
        return vlm_maps_for(spec, text, image, title, answer_tokens)
    from ..checkpoints.io import load_model
    model, tok, _ = load_model(spec)
    if tok is None:
        raise PicochatError(f"{spec} has no tokenizer.json, so text cannot be read into it")
    return gpt_maps(model, tok, tok.encode(text), title)
