"""The multimodal model's vision encoder, first taught alone: what lies under each patch.

    loss = -1/(B G^2) sum_{b, n} log softmax(W h_{b,n})[c_{b,n}]      h = ViT.forward_features(image)  (B, G^2, d_v)

c_{b,n} is the class of the shape covering most of patch n (data/scenes.patch_classes: background, or one of
3 kinds x 4 colours), known exactly because the training scenes are generated. This plays the part of the
pretrained image encoder (SigLIP, CLIP) that nanoVLM and LLaVA start from, which a from-scratch picochat does
not have. Trained only through the answers, the ViT learned slowly: which shape is where is a weak signal
when it arrives through one word of one answer. Measured on the validation scenes, 10,000 training scenes,
4 ViT layers, patch 4, batch 64, 1 thread:

    a head on the mean of the states, 600 steps, "colour of the circle / square / triangle":  76% / 87% / 89%
    this dense head, 600 steps (73 s), same questions read off its patch predictions:         98% / 98% / 100%

and the whole model then answered 99% of the validation questions after 750 steps (82% without the image
token positions of model/multimodal.py, 68% with neither). Learning which kind of shape a patch belongs to
comes suddenly, after a plateau near loss 0.2 (colour and background known, kind not), and, without
clipping, when depended on the seed: at 600 steps 1 of 3 seeds had got there (98% of patches), two had not
(92%, 94%); at 1,200 steps the default seed's loss spiked (0.2 -> 0.97) and it ended at 92%, and a stage 1
still on the plateau cost the whole model 20 points (67% of validation questions at step 500). With the
gradient norm clipped at 1 (as the Trainer does in stage 2) and 1,200 steps, three seeds gave 99.8-99.9%.
2-D sinusoidal positions and 8x8 overlapping patches, tried unclipped at 600 steps, did not help. The head is
thrown away afterwards. Only scenes are used (a digit has no shapes); the ViT meets the digits in stage 2.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..errors import PicochatError


@torch.no_grad()
def patch_accuracy(vit, head, pixels: torch.Tensor, targets: torch.Tensor, batch_size: int = 512) -> float:
    """Share of patches whose class the ViT + head predicts: pixels (M, 3, H, W) uint8, targets (M, G^2)."""
    from ..data.scenes import to_model_input
    was = vit.training
    vit.eval()
    right = 0
    for s in range(0, len(pixels), batch_size):
        logits = head(vit.forward_features(to_model_input(pixels[s:s + batch_size])))   # (b, G^2, K)
        right += int((logits.argmax(-1) == targets[s:s + batch_size]).sum())
    vit.train(was)
    return right / max(1, targets.numel())


def scene_targets(split, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's scenes -> (pixels (M, 3, H, W) uint8, patch classes (M, G^2) long)."""
    from ..data.scenes import patch_classes
    rows = [i for i, shapes in enumerate(split.shapes) if shapes]
    if not rows:
        raise PicochatError("no scenes to pretrain the vision encoder on: raise --train-scenes")
    return split.images[rows], torch.stack([patch_classes(list(split.shapes[i]), patch) for i in rows])


def pretrain_patches(vit, train, val, steps: int, lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                     weight_decay: float = 0.05, warmup: int = 50, grad_clip: float = 1.0, log=None) -> dict:
    """Train vit (in place) to classify every patch of the training scenes; -> metrics (val patch accuracy).
    Batches are a pure function of (seed, step): the same call gives the same weights."""
    from ..data.scenes import PATCH_CLASSES, to_model_input
    from ..train.optim import lr_at
    p = vit.config.patch_size
    x_train, y_train = scene_targets(train, p)
    x_val, y_val = scene_targets(val, p)
    head = torch.nn.Linear(vit.config.n_embd, PATCH_CLASSES)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    vit.train()
    t0, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, 0.1)
        idx = torch.randint(0, len(x_train), (batch_size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        logits = head(vit.forward_features(to_model_input(x_train[idx])))       # (B, G^2, K)
        loss_t = F.cross_entropy(logits.reshape(-1, PATCH_CLASSES), y_train[idx].reshape(-1))
        loss_t.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss_t.detach())
        if log and (step + 1) % 100 == 0:
            log(f"vision pretraining {step + 1}/{steps}: patch loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    out = {"steps": steps, "loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)}
    if steps:
        out["val_patch_accuracy"] = round(patch_accuracy(vit, head, x_val, y_val), 4)
        out["background_share"] = round(float((y_val == 0).float().mean()), 4)  # the accuracy of predicting 0 always
    return out
