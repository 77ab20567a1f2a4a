"""``picochat vision``: train the vision transformer on the 8x8 digits, or read digits from pictures.

    picochat vision train --out-dir runs/vision       # the ViT and an SVM on one held-out split; --help lists options
    picochat vision predict runs/vision seven.png three.jpg
    -> seven.png: 7  (7 0.981, 1 0.012, 9 0.003)

MODEL is a run directory (its latest checkpoint) or a checkpoint folder. Pictures are PNG or JPEG files of at
most 20 MB and 4096x4096 pixels. Each becomes a dataset-like 8x8 digit first: grayscale, inverted if the
background is light (ink bright on dark), background level removed, cropped to the ink and centred in a
square (--no-crop keeps the whole picture), box-filtered to 8x8 and scaled to integers 0..16 (the steps are
in picochat/vision/data.py, image_to_digit). All pictures are read before any is predicted.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class PredictConfig:
    model: str = ""
    """A vision model: the run directory of `picochat vision train`, or one of its checkpoint folders."""
    images: list[str] = field(default_factory=list)
    """PNG or JPEG files, one digit each."""
    crop: bool = True
    """Crop each picture to its ink and centre it in a square before shrinking it to 8x8 (the dataset's digits
    span the full height); --no-crop shrinks the whole picture. The test digits drawn dark on white at 48x48 in
    a 120x90 page: 99.2% right with the crop, 10% without (the digit is a smudge in one corner)."""
    top: int = 3
    """How many of the most probable digits to print beside the prediction (1-10)."""
    json: bool = False
    """Print one JSON object {"image", "digit", "probabilities"} per picture instead of a line of text."""

    def __post_init__(self):
        if not 1 <= self.top <= 10:
            raise PicochatError(f"--top must be in [1, 10], got {self.top}")


def predict(cfg: PredictConfig) -> list[dict]:
    """The plain-Python form of `picochat vision predict MODEL IMAGE...`: prints and returns one dict per image."""
    import torch
    from .data import read_digit, to_model_input
    from .train import load_vision
    if not cfg.model:
        raise PicochatError("name a vision model: picochat vision predict runs/vision digit.png")
    model, task, _ = load_vision(cfg.model)  # a bad folder is refused before the images are looked at
    if not cfg.images:
        raise PicochatError("give one or more PNG or JPEG images: picochat vision predict MODEL digit.png")
    pixels = torch.stack([read_digit(p, crop=cfg.crop) for p in cfg.images])  # (B, 8, 8); all checked first
    labels = task.get("labels", [str(k) for k in range(model.config.num_classes)])
    with torch.no_grad():
        probs = torch.softmax(model(to_model_input(pixels))[0].float(), dim=-1)  # (B, K)
    out = []
    for path, p in zip(cfg.images, probs):
        ranked = p.argsort(descending=True).tolist()
        row = {"image": path, "digit": labels[ranked[0]],
               "probabilities": {labels[k]: round(float(p[k]), 4) for k in range(len(labels))}}
        out.append(row)
        if cfg.json:
            print(json.dumps(row))
        else:
            print(f"{path}: {row['digit']}  (" + ", ".join(f"{labels[k]} {float(p[k]):.3f}" for k in ranked[:cfg.top])
                  + ")")
    return out


def train(args) -> int:
    from .train import VisionTrainConfig, vision_train
    r = vision_train(dataclass_from_args(VisionTrainConfig, args))
    print(f"held-out test accuracy on {r['test_n']} digits: ViT {r['test_accuracy']:.2%} ({r['test_correct']}/"
          f"{r['test_n']}), SVC {r['baseline']['test_accuracy']:.2%}, classic SVC(gamma=0.001) "
          f"{r['baseline_classic']['test_accuracy']:.2%}; trained in {r['train_seconds']:.0f} s; "
          f"results.json and accuracy.png in {args.out_dir}")
    return 0


def add_parser(sub) -> None:
    from .train import VisionTrainConfig
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("vision", help="the vision transformer: train it on the 8x8 digits, or read digits from pictures",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=fmt)
    cmds = p.add_subparsers(dest="vision_command", metavar="{train,predict}", required=True)
    t = cmds.add_parser("train", help="train a ViT on the digits (fixed held-out split) beside an SVM baseline",
                        description=__import__("picochat.vision.train", fromlist=["x"]).__doc__.split("\n\n")[0],
                        epilog="The run reproduces the README's number: picochat vision train --out-dir runs/vision",
                        formatter_class=fmt)
    add_dataclass_args(t, VisionTrainConfig)
    t.set_defaults(func=train)
    r = cmds.add_parser("predict", help="MODEL IMAGE...: the digit in each PNG/JPEG picture, with probabilities",
                        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=fmt)
    add_dataclass_args(r, PredictConfig, positional=("model", "images"))
    r.set_defaults(func=lambda args: predict(dataclass_from_args(PredictConfig, args)) and 0)
