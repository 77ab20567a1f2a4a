"""Train the multimodal chat model (`picochat vlm train`): a ViT, a projector and a GPT, from scratch, in two stages.

    stage 1 (vision/patches.py): the ViT alone classifies what lies under each patch of the training scenes
    stage 2: loss = -1/|A| sum_{t in A} log p(x_{t+1} | x_{<=t}, image)      A = the answer's tokens and its end token
             everything trains; the pretrained ViT at --vit-lr-mult times the learning rate (nanoVLM's recipe)

A training row is a conversation about one picture (data/scenes.py: digits and coloured shapes): the picture
(an image part: N <|image|> markers) with the first question, then up to --turns questions in all, each answered:

    <|endoftext|><|user_start|><|image|> x N  What colour is the circle?<|user_end|><|assistant_start|>red<|assistant_end|>
    <|user_start|>How many shapes are there?<|user_end|><|assistant_start|>2<|assistant_end|> ...

The loss mask is render_conversation's, so the markers and the questions are never targets. Several answers per
picture is what makes this fast: the ViT learns from answers only, and one pass over a picture then gets several
answers' worth of gradient. Batches are a pure function of the step (exact resume): a digit with probability
--digit-share, else a scene; its questions drawn without replacement, each type of question equally likely (a
3-shape scene has 6 "left" questions, 1 count). What mattered, on 100 validation questions per type:

    one question per row, answers only, 1,500 steps                          67%
    4 questions per row, 1,500 steps                                         73%   colour 52%, "left" at chance
    + stage 1 (600 steps), ViT at 0.1 x lr, 750 steps                        82%   colour 100%, "left" at chance
    + a learned position per image token (model/multimodal.py), 750 steps     99%

The tokenizer (byte-level BPE with the chat tokens and <|image|>) is trained on the training questions and answers.

Validation accuracy (greedy answers through the KV-cache engine, exact match) is watched every --eval-every
steps; the held-out test pictures are scored once, at the end, by the last model, per question type and
overall, beside two baselines from the training answers: the majority answer of each question type, and the
best any text-only model can do (the most frequent answer to each exact question; it never sees the picture).
results.json, accuracy.png, and examples/ (test pictures to try: picochat chat RUN --image FILE) go to --out-dir.

    picochat vlm train --out-dir runs/vlm
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from ..fsutil import atomic_write
from .loop import TrainConfig, Trainer


@dataclass
class VLMTrainConfig(TrainConfig):
    out_dir: str = "runs/vlm"
    """Run directory: checkpoints, metrics.jsonl, loss.png, accuracy.png, results.json, examples/."""
    train_scenes: int = 10000
    """Generated shape scenes to train on (with the digits' training split)."""
    val_scenes: int = 300
    """Held-out scenes for the validation accuracy watched during training."""
    test_scenes: int = 600
    """Held-out scenes scored once at the end (duplicates of a training scene are dropped)."""
    data_seed: int = 0
    """Seed of the generated scenes (the digits' split is picochat vision's, --split-seed)."""
    split_seed: int = 0
    """Seed of the digits' stratified train/val/test split."""
    vocab_size: int = 512
    """BPE vocabulary (the questions and answers need few tokens; it may come out smaller)."""
    n_layer: int = 4
    """GPT layers."""
    n_head: int = 4
    """GPT attention heads."""
    n_embd: int = 128
    """GPT width d (the projector's output)."""
    block_size: int = 128
    """GPT context, in tokens (a one-question conversation is about 35; chat keeps several turns)."""
    patch_size: int = 4
    """ViT patch side, pixels: a 24x24 picture is (24/p)^2 patches."""
    vit_layers: int = 4
    """ViT layers."""
    vit_heads: int = 4
    """ViT attention heads."""
    vit_embd: int = 96
    """ViT width."""
    pixel_shuffle: int = 2
    """s x s patches per image token: N = (24 / patch / s)^2 image tokens in the GPT's sequence."""
    vit_pretrain_steps: int = 1200
    """Steps of the first stage: the ViT alone learns what lies under each patch of the training scenes
    (vision/patches.py; 2-3 minutes). 0 trains it only through the answers."""
    vit_lr_mult: Optional[float] = None
    """The ViT's learning rate in the second stage, as a fraction of --lr (default: 0.1 after stage 1, 1
    without it; a value given is used either way)."""
    turns: int = 4
    """Questions per training conversation about one picture (1 = one question per row)."""
    digit_share: float = 0.2
    """Fraction of training conversations about a digit (the rest are about a scene)."""
    val_questions: int = 600
    """Validation questions answered at each evaluation (the same ones each time, balanced by type)."""
    examples: int = 8
    """Test pictures written to out_dir/examples/ as PNG, with their questions and answers."""
    threads: int = 0
    """torch threads (0 = torch's default). On a busy machine 1 can be much faster than 2: OpenMP threads
    spin waiting for each other while another job holds a core."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Conversations (one picture each) per micro-batch."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only)."""
    eval_every: int = 250
    """Validation loss and accuracy every this many steps (and at the end)."""
    ckpt_every: int = 500
    """Write a checkpoint every this many steps (and at the end)."""
    dtype: str = "fp32"
    """Autocast dtype (fp32, bf16, auto). bf16 was no faster at this size on a 2-core CPU."""

    def __post_init__(self):
        super().__post_init__()
        if min(self.train_scenes, self.val_scenes, self.test_scenes) < 1:
            raise PicochatError("--train-scenes, --val-scenes and --test-scenes must be at least 1")
        if self.val_questions < 1 or self.turns < 1 or self.examples < 0 or self.threads < 0:
            raise PicochatError("--val-questions and --turns must be >= 1, --examples and --threads >= 0")
        if self.vit_lr_mult is None:
            self.vit_lr_mult = 0.1 if self.vit_pretrain_steps else 1.0
        if self.vit_pretrain_steps < 0 or self.vit_lr_mult < 0:
            raise PicochatError("--vit-pretrain-steps and --vit-lr-mult must be >= 0")
        if not 0 <= self.digit_share <= 1:
            raise PicochatError(f"--digit-share must be in [0, 1], got {self.digit_share}")


# ---- examples ----------------------------------------------------------------------------------------------
class Renderer:
    """(question, answer) -> ids and loss mask of the one-picture conversation, cached (questions repeat)."""

    def __init__(self, tokenizer, n_tokens: int):
        from ..chat_template import IMAGE_TOKEN, pick_template, stop_token_ids
        self.tokenizer, self.n_tokens = tokenizer, n_tokens
        self.template = pick_template(tokenizer)
        self.image_id = tokenizer.special_tokens[IMAGE_TOKEN]
        self.stops = stop_token_ids(tokenizer, self.template)
        self._cache: dict = {}

    def __call__(self, question: str, answer: str | None = None) -> tuple[list[int], list[int]]:
        key = (question, answer)
        if key not in self._cache:
            from ..chat_template import render_conversation
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            if answer is not None:
                msgs.append({"role": "assistant", "content": answer})
            self._cache[key] = render_conversation(msgs, self.tokenizer, self.template, add_generation_prompt=answer is None,
                                                   image_tokens=self.n_tokens)
        return self._cache[key]


class Conversations:
    """Training rows: a picture and `turns` of its questions, asked one after another (see the module docstring)."""

    def __init__(self, split, render: Renderer, turns: int, digit_share: float):
        self.split, self.render, self.turns, self.digit_share = split, render, turns, digit_share
        self.questions: list[list] = [[] for _ in range(len(split.images))]
        for q in split.qa:
            self.questions[q.image].append(q)
        self.digits = [i for i, s in enumerate(split.sources) if s.startswith("digit")]
        self.scenes = [i for i, s in enumerate(split.sources) if not s.startswith("digit")]

    def conversation(self, image: int, g: torch.Generator) -> tuple[list[int], list[int]]:
        from ..chat_template import render_conversation
        qs = self.questions[image]
        n_type = collections.Counter(q.type for q in qs)
        weights = torch.tensor([1.0 / n_type[q.type] for q in qs])  # each type present equally likely
        pick = torch.multinomial(weights, min(self.turns, len(qs)), replacement=False, generator=g).tolist()
        msgs = []
        for j, k in enumerate(pick):
            text = qs[k].question
            msgs += [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}] if j == 0 else text},
                     {"role": "assistant", "content": qs[k].answer}]
        r = self.render
        return render_conversation(msgs, r.tokenizer, r.template, image_tokens=r.n_tokens)

    def batch(self, key: int, batch_size: int):
        """(x, y, images), a pure function of key; y is -1 except on the answers."""
        from ..data.scenes import to_model_input
        g = torch.Generator().manual_seed(key)
        images, rows = [], []
        for _ in range(batch_size):
            pool = self.digits if self.digits and (not self.scenes or float(torch.rand(1, generator=g)) < self.digit_share) \
                else self.scenes
            images.append(pool[int(torch.randint(0, len(pool), (1,), generator=g))])
            rows.append(self.conversation(images[-1], g))
        x, y = pad_rows(rows, self.render.tokenizer.eot_id)
        return x, y, to_model_input(self.split.images[torch.tensor(images)])

    def longest(self) -> int:
        """An upper bound on a row's length: the picture and its `turns` longest questions and answers."""
        r = self.render
        per = sorted((len(r(q.question, q.answer)[0]) for q in self.split.qa), reverse=True)
        return per[0] + sum(per[1:self.turns])


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, loss mask) rows -> inputs x (B, T-1) and targets y (B, T-1): the next token where the mask trains it,
    else -1. Padding goes after every real token, where causal attention never lets a real token read it."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (i, m) in enumerate(rows):
        ids[b, :len(i)], mask[b, :len(m)] = torch.tensor(i), torch.tensor(m, dtype=torch.bool)
    return ids[:, :-1], torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))


# ---- answering and scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def answer_questions(model, render: Renderer, pixels: torch.Tensor, items: list[tuple[int, str]],
                     batch_size: int = 128, max_tokens: int = 24) -> list[str]:
    """Greedy answers through the KV-cache engine: items are (picture row of pixels, question)."""
    from ..checkpoints.vlm import encode_pixels
    from ..engine.engine import Engine, PromptEmbeds
    device = next(model.parameters()).device
    with torch.autocast(device_type=device.type, enabled=False):  # inference as chat runs it: fp32
        pictures = sorted({i for i, _ in items})
        z = {}
        for s in range(0, len(pictures), 256):
            chunk = pictures[s:s + 256]
            zs = encode_pixels(model.vision, pixels[chunk]).view(len(chunk), -1, model.gpt.config.n_embd)
            z.update(zip(chunk, zs))
        engine, out = Engine(model.gpt, render.tokenizer), []
        for s in range(0, len(items), batch_size):
            prompts = [render(q)[0] for _, q in items[s:s + batch_size]]
            embeds = [PromptEmbeds.at_markers(p, render.image_id, z[i]) for p, (i, _) in zip(prompts, items[s:s + batch_size])]
            res = engine.generate(prompts, embeds=embeds, temperature=0, max_tokens=max_tokens,
                                  stop_token_ids=render.stops)
            out += [r.text.strip() for r in res]
    return out


def score(qa: list, answers: list[str], types: tuple[str, ...]) -> dict:
    """Exact-match accuracy per question type, overall (every question counts once) and macro (types equal)."""
    per = {t: [0, 0] for t in types}
    for q, a in zip(qa, answers):
        per[q.type][0] += int(a == q.answer)
        per[q.type][1] += 1
    per_type = {t: {"accuracy": round(c / n, 4), "correct": c, "n": n} for t, (c, n) in per.items() if n}
    correct, n = sum(c for c, _ in per.values()), sum(n for _, n in per.values())
    return {"accuracy": round(correct / max(n, 1), 4), "correct": correct, "n": n,
            "macro_accuracy": round(sum(v["accuracy"] for v in per_type.values()) / max(len(per_type), 1), 4),
            "per_type": per_type}


def baselines(train_qa: list, test_qa: list, types: tuple[str, ...]) -> dict:
    """Answers without the picture, learnt from the training answers: the majority per type, and per exact
    question (the best exact-match score a text-only model can reach on these questions)."""
    by_type = {t: collections.Counter(q.answer for q in train_qa if q.type == t) for t in types}
    by_question = collections.defaultdict(collections.Counter)
    for q in train_qa:
        by_question[q.question][q.answer] += 1
    majority = [by_type[q.type].most_common(1)[0][0] if by_type[q.type] else "" for q in test_qa]
    blind = [by_question[q.question].most_common(1)[0][0] if q.question in by_question else "" for q in test_qa]
    return {"majority_per_type": score(test_qa, majority, types), "text_only_best": score(test_qa, blind, types)}


def plot_accuracy(rows: list[dict], results: dict, types: tuple[str, ...], out_png: Path) -> None:
    """Loss (train, val) and validation accuracy per type against step, with the test and baseline levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, val = [r for r in rows if "loss" in r], [r for r in rows if "val_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val loss")
    a.set_yscale("log"); a.set_xlabel("step"); a.set_ylabel("cross-entropy on answers"); a.grid(alpha=0.3); a.legend()
    for t in types:
        pts = [(r["step"], r[f"val_acc/{t}"]) for r in val if f"val_acc/{t}" in r]
        if pts:
            b.plot(*zip(*pts), lw=1, alpha=0.7, label=t)
    b.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "k-o", ms=3, lw=2, label="val, all")
    b.axhline(results["test"]["accuracy"], color="k", ls="--", label=f"test {results['test']['accuracy']:.1%}")
    blind = results["baselines"]["text_only_best"]["accuracy"]
    b.axhline(blind, color="C3", ls=":", label=f"text-only best {blind:.1%}")
    b.set_ylim(0, 1.02); b.set_xlabel("step"); b.set_ylabel("exact-match accuracy"); b.grid(alpha=0.3)
    b.legend(fontsize=7, ncol=2)
    a.set_title("multimodal chat: loss"); b.set_title("held-out questions answered exactly")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out_png, buf.getvalue())


# ---- the stage ---------------------------------------------------------------------------------------------
def build_model(cfg: VLMTrainConfig, tokenizer):
    from ..chat_template import IMAGE_TOKEN
    from ..model.config import ModelConfig
    from ..model.gpt import GPT
    from ..model.multimodal import VLM, ImageEncoder, VisionConfig
    from ..data.scenes import CHANNELS, IMAGE_SIZE
    vision = VisionConfig(vit=dict(image_size=IMAGE_SIZE, channels=CHANNELS, patch_size=cfg.patch_size,
                                   n_layer=cfg.vit_layers, n_head=cfg.vit_heads, n_embd=cfg.vit_embd),
                          pixel_shuffle=cfg.pixel_shuffle, lm_width=cfg.n_embd)
    # init std 1/sqrt(d), not GPT-2's 0.02 (made for d = 768): at d = 128 attention starts so flat that after 200
    # steps the GPT still answered "What colour is the circle?" with "there is no triangle" (loss 0.69 vs 0.67)
    lm = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, init_std=cfg.n_embd ** -0.5)
    torch.manual_seed(cfg.seed)
    return VLM(GPT(lm), ImageEncoder(vision), tokenizer.special_tokens[IMAGE_TOKEN])


def vlm_train(cfg: VLMTrainConfig) -> dict:
    """Make the data, train, score the held-out test questions; returns (and writes) results.json's dict."""
    from ..chat_template import IMAGE_TOKEN
    from ..checkpoints.vlm import load_vlm_weights, save_vlm
    from ..data import scenes as S
    from ..tokenizer import SPECIAL_TOKENS, Tokenizer
    t0, load_start = time.perf_counter(), os.getloadavg()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sets = S.make_splits(cfg.data_seed, cfg.train_scenes, cfg.val_scenes, cfg.test_scenes, cfg.split_seed)
    tokenizer = Tokenizer.train(S.text_corpus(sets), cfg.vocab_size, special_tokens=SPECIAL_TOKENS + [IMAGE_TOKEN])
    model = build_model(cfg, tokenizer)
    types = S.QUESTION_TYPES
    render = Renderer(tokenizer, model.vision.n_tokens)
    train = Conversations(sets["train"], render, cfg.turns, cfg.digit_share)
    if train.longest() > cfg.block_size:
        raise PicochatError(f"a training conversation may be {train.longest()} tokens: raise --block-size or lower --turns")
    per_type = max(1, cfg.val_questions // len(types))  # evenly spread over each type, the same every time
    val_qa = [q for t, qs in sets["val"].by_type().items() for q in qs[::max(1, len(qs) // per_type)][:per_type]]
    val_rows = [render(q.question, q.answer) for q in val_qa]
    data_info = {k: {"images": len(v.images), "questions": len(v.qa), "fingerprint": v.fingerprint()} for k, v in sets.items()}
    data_info |= {"data_seed": cfg.data_seed, "split_seed": cfg.split_seed, "image_size": S.IMAGE_SIZE,
                  "train_scenes": cfg.train_scenes, "val_scenes": cfg.val_scenes, "test_scenes": cfg.test_scenes}
    B, box = cfg.batch_size, []

    def batch_fn(step: int, micro: int):
        return train.batch(cfg.seed * 1_000_003 + step * cfg.grad_accum * box[0].dist.world + micro, B)

    def loss_fn(m, batch):
        x, y, images = batch
        return m(x, y, images=images)[1]

    def eval_fn(m):
        total, n = 0.0, 0
        for s in range(0, len(val_qa), 256):
            x, y = pad_rows(val_rows[s:s + 256], tokenizer.eot_id)
            images = S.to_model_input(sets["val"].images[torch.tensor([q.image for q in val_qa[s:s + 256]])])
            dev = next(m.parameters()).device
            _, loss = m(x.to(dev), y.to(dev), images=images.to(dev), loss_reduction="sum")
            total, n = total + float(loss), n + int((y >= 0).sum())
        got = score(val_qa, answer_questions(m, render, sets["val"].images, [(q.image, q.question) for q in val_qa]), types)
        return {"val_loss": total / max(n, 1), "val_accuracy": got["accuracy"]} | {
            f"val_acc/{t}": v["accuracy"] for t, v in got["per_type"].items()}

    def load_weights(ckpt: Path):
        from ..checkpoints.vlm import read_vision_config
        if read_vision_config(ckpt) is None or read_vision_config(ckpt).to_dict() != model.vision.config.to_dict():
            raise PicochatError(f"cannot resume: {ckpt} has another image encoder; use the same options or a new --out-dir")
        saved = json.loads((ckpt / "state.json").read_text()).get("run", {}).get("data")
        if saved != json.loads(json.dumps(data_info)):
            raise PicochatError(f"cannot resume: {cfg.out_dir} was trained on other data; repeat its data options or use a new --out-dir")
        load_vlm_weights(box[0].raw_model, ckpt)

    trainer = Trainer(cfg, model, batch_fn, loss_fn, eval_fn=eval_fn, tokenizer=tokenizer,
                      tokens_per_micro=B * (2 + render.n_tokens + 16 * cfg.turns),  # about: for tokens/s
                      run_info={"stage": "vlm", "data": data_info, "params": model.num_params()},
                      save_weights=lambda path, extra: save_vlm(box[0].raw_model, path, tokenizer, extra),
                      load_weights=load_weights, lr_mult=lambda name: cfg.vit_lr_mult if name.startswith("vision.vit.") else 1.0)
    box.append(trainer)
    if trainer.dist.world > 1:
        raise PicochatError("picochat vlm trains in one process (minutes on a CPU); run it without torchrun")
    stage1 = {"steps": 0}
    if cfg.vit_pretrain_steps and not (cfg.resume and trainer.ckpts.latest() is not None):  # else: in the checkpoint
        from ..vision.patches import pretrain_patches
        stage1 = pretrain_patches(model.vision.vit, sets["train"], sets["val"], cfg.vit_pretrain_steps,
                                  lr=cfg.lr, batch_size=B, seed=cfg.seed, log=print if cfg.progress else None)
        if cfg.progress:
            print(f"vision pretraining: {stage1['val_patch_accuracy']:.1%} of validation patches classified "
                  f"(all background: {stage1['background_share']:.1%}) in {stage1['seconds']:.0f} s")
    if cfg.progress:
        print(f"vlm: GPT {model.gpt.num_params():,} + image encoder {model.vision.num_params():,} parameters, "
              f"{model.vision.n_tokens} image tokens per picture, vocabulary {tokenizer.vocab_size}; "
              f"{len(sets['train'].qa):,} training questions on {len(sets['train'].images):,} pictures; "
              f"{torch.get_num_threads()} threads, load {load_start[0]:.2f}")
    t_fit = time.perf_counter()
    rows = trainer.fit()
    train_s = time.perf_counter() - t_fit + stage1.get("seconds", 0)
    model = trainer.raw_model.eval()
    test_qa = sets["test"].qa
    answers = answer_questions(model, render, sets["test"].images, [(q.image, q.question) for q in test_qa])
    results = {"test": score(test_qa, answers, types), "baselines": baselines(sets["train"].qa, test_qa, types),
               "steps": cfg.max_steps, "train_seconds": round(train_s, 1), "data": data_info,
               "vision_pretraining": stage1,
               "params": {"gpt": model.gpt.num_params(), "image_encoder": model.vision.num_params()},
               "image_tokens": model.vision.n_tokens, "model": model.config.to_dict(),
               "dtype": str(trainer.amp_dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_average": {"start": [round(v, 2) for v in load_start],
                                                        "end": [round(v, 2) for v in os.getloadavg()]},
               "wrong": [{"image": q.image, "question": q.question, "answer": q.answer, "got": a}
                         for q, a in zip(test_qa, answers) if a != q.answer][:50]}
    out = Path(cfg.out_dir)
    results["examples"] = write_examples(sets["test"], out / "examples", cfg.examples, S)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    plot_accuracy(rows, results, types, out / "accuracy.png")
    return results


def write_examples(test, folder: Path, n: int, S) -> list[dict]:
    """n test pictures (a quarter digits, the rest scenes) as 192x192 PNGs (each pixel 8x8: chat reads them
    back to the same 24x24), with their questions and answers."""
    digits = [i for i, src in enumerate(test.sources) if src.startswith("digit")][:n // 4]
    picks = digits + [i for i, src in enumerate(test.sources) if src.startswith("scene")][:n - len(digits)]
    out = []
    for i in picks:
        name = f"{test.sources[i].replace(':', '_')}.png"
        S.save_png(test.images[i], folder / name, scale=8)
        out.append({"file": f"examples/{name}", "qa": [[q.question, q.answer] for q in test.qa if q.image == i]})
    return out


# ---- the verb ----------------------------------------------------------------------------------------------
def run_train(args) -> int:
    r = vlm_train(dataclass_from_args(VLMTrainConfig, args))
    per = ", ".join(f"{t} {v['accuracy']:.1%}" for t, v in r["test"]["per_type"].items())
    print(f"held-out: {r['test']['accuracy']:.2%} of {r['test']['n']} questions answered exactly ({per}); "
          f"text-only best {r['baselines']['text_only_best']['accuracy']:.2%}, majority per type "
          f"{r['baselines']['majority_per_type']['accuracy']:.2%}; trained in {r['train_seconds']:.0f} s. "
          f"results.json, accuracy.png, examples/ in {args.out_dir}")
    return 0


def add_parser(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("vlm", help="multimodal chat: train a GPT that sees pictures (digits, coloured shapes)",
                       description=__doc__.split("\n\n")[0], formatter_class=fmt)
    cmds = p.add_subparsers(dest="vlm_command", metavar="{train}", required=True)
    t = cmds.add_parser("train", help="train the ViT + projector + GPT; score held-out questions beside baselines",
                        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=fmt)
    add_dataclass_args(t, VLMTrainConfig)
    t.set_defaults(func=run_train)
