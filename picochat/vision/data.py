"""The 8x8 digits of scikit-learn (1,797 images, no download), their fixed split, augmentation, and user images.

The dataset is the test half of UCI's "optdigits" (13 writers): 32x32 black-and-white bitmaps of handwritten
digits, each divided into non-overlapping 4x4 blocks whose "on" pixels are counted, giving 8x8 images of
integers 0..16 with bright ink on a dark (0) background; every digit spans all 8 rows. The model reads
pixel / 16.

The split (``split_digits``) is fixed and stratified: for each digit, a torch.Generator seeded with
``split_seed`` (default 0) shuffles that digit's indices; the first round(test_fraction * n) go to the
test set, the next round(val_fraction * n) to validation, the rest to training. Defaults: 0.2 and 0.1 ->
359 test, 179 validation, 1,259 training images. Training reads only the training images; validation is
what the run watches while it trains; the test images are scored once, at the end (never used to train or
to choose anything). ``split_fingerprint`` (in results.json) identifies the test set. The split is by image:
the dataset does not say who wrote which digit, so the same 13 hands are on both sides (as in the usual
results on this set, the SVM's included).

A user's picture becomes a dataset-like 8x8 array in ``image_to_digit`` (the steps are in its docstring).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from ..errors import PicochatError

PIXEL_MAX = 16          # the dataset's pixel values are counts 0..16
IMAGE_SIZE = 8


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 8, 8) float32 in 0..16, labels (1797,) int64): scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        raise PicochatError("the digits come with scikit-learn: pip install 'scikit-learn>=1.5,<2'") from None
    d = sk_load()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def split_digits(labels: torch.Tensor, test_fraction: float = 0.2, val_fraction: float = 0.1,
                 seed: int = 0) -> dict[str, list[int]]:
    """{"train", "val", "test"}: disjoint sorted index lists, stratified by digit with a fixed-seed shuffle."""
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction <= 0.8):
        raise PicochatError(f"--test-fraction {test_fraction} and --val-fraction {val_fraction} must be fractions "
                            "that leave at least 20% of the images for training")
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    g = torch.Generator().manual_seed(seed)
    for k in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        n_test, n_val = round(test_fraction * len(idx)), round(val_fraction * len(idx))
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test:n_test + n_val]
        out["train"] += idx[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items()}


def split_fingerprint(indices: list[int]) -> str:
    """sha256 (first 16 hex digits) of the sorted indices: two runs with one fingerprint hold out the same images."""
    return hashlib.sha256(",".join(map(str, sorted(indices))).encode()).hexdigest()[:16]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) pixel counts 0..16 -> (B, 1, 8, 8) in 0..1, what the ViT reads."""
    return (images / PIXEL_MAX).unsqueeze(1)


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """A permutation of range(n) that depends only on (epoch, seed): batches are a pure function of the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def affine(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) each turned by angle (B,) radians counter-clockwise (as torch.rot90 turns them),
    scaled by scale (B,) about the centre and moved by shift (B, 2) pixels (x right, y down); bilinear
    resampling, background 0.

    In coordinates normalised to [-1, 1] (x right, y down), the input point p goes to
    u = scale * R p + t with R = [[cos, sin], [-sin, cos]] and t = 2 * shift / size. Output pixel u reads
    the input at the inverse, p = R^T (u - t) / scale, so every output pixel is defined (affine_grid's theta).
    """
    B, _, H, W = x.shape
    c, s = angle.cos() / scale, angle.sin() / scale
    t = shift * 2 / torch.tensor([W, H], dtype=shift.dtype)                    # (B, 2), normalised
    tx, ty = t[:, 0], t[:, 1]
    theta = torch.stack([torch.stack([c, -s, -(c * tx - s * ty)], -1),
                         torch.stack([s, c, -(s * tx + c * ty)], -1)], 1)     # (B, 2, 3)
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(x: torch.Tensor, rotate: float, scale: float, translate: float, gen: torch.Generator) -> torch.Tensor:
    """Each image (B, C, H, W) turned by its own angle in [-rotate, rotate] degrees, scaled by a factor in
    [1 - scale, 1 + scale] and moved by up to translate pixels in x and in y (uniform draws from gen). A digit
    written slightly tilted, larger or off-centre is the same digit."""
    if rotate == 0 and scale == 0 and translate == 0:
        return x
    B = x.size(0)
    angle = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(rotate)
    factor = 1 + (torch.rand(B, generator=gen) * 2 - 1) * scale
    shift = (torch.rand(B, 2, generator=gen) * 2 - 1) * translate
    return affine(x, angle, factor, shift)


# ---- a user's picture -> an 8x8 digit ---------------------------------------------------------------------
def open_image(path: str | Path):
    """The decoded Pillow image, or one clear PicochatError: missing, too large, not PNG/JPEG, corrupt
    (the one reader every picture goes through: data/scenes.open_image)."""
    from ..data.scenes import open_image as read
    return read(path)


def image_to_digit(img, crop: bool = True) -> torch.Tensor:
    """A Pillow image -> (8, 8) float32 of integers 0..16, made the way the dataset's images were:

    1. EXIF orientation applied; transparency composited over white; convert('L') (luma, 0..255).
    2. Invert if the background is light (the mean of the outermost pixels > 127): ink becomes bright on
       dark, as in the dataset.
    3. The background level (median of the outermost pixels) is subtracted and clipped at 0.
    4. crop: cut to the bounding box of the ink (pixels above a quarter of the brightest) and pad it to a
       square with background, centred: the dataset's digits were scaled to span the full height.
    5. Resize to 8x8 with Pillow's BOX filter: each output pixel is the mean of its block of input pixels,
       the dataset's own 4x4-block counting.
    6. Scale so the brightest pixel is 16 and round to integers 0..16 (the dataset's counts).

    A dataset image saved as an 8x8 PNG (digit_to_png) comes back exactly with crop=False when its brightest
    pixel is 16 (1,765 of the 1,797; the others come back scaled up to 16). A blank image is refused.
    """
    import numpy as np
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    a = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32).copy())  # (H, W) in 0..255
    border = torch.cat([a[0], a[-1], a[:, 0], a[:, -1]])
    if border.mean() > 127:
        a, border = 255 - a, 255 - border
    a = (a - border.median()).clamp(min=0)
    if float(a.max()) <= 0:
        raise PicochatError("the image is blank (one flat colour): there is no digit to read")
    if crop:
        ys, xs = torch.nonzero(a > 0.25 * a.max(), as_tuple=True)
        a = a[int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1]
        h, w = a.shape
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        a = torch.nn.functional.pad(a, (left, side - w - left, top, side - h - top))
    small = Image.fromarray(a.numpy()).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)  # mode "F"
    out = torch.from_numpy(np.asarray(small, dtype=np.float32).copy()).clamp(min=0)  # (8, 8)
    if float(out.max()) <= 0:
        raise PicochatError("the image is blank (one flat colour): there is no digit to read")
    return torch.round(out / out.max() * PIXEL_MAX)


def read_digit(path: str | Path, crop: bool = True) -> torch.Tensor:
    """A PNG or JPEG file -> (8, 8) digits-style pixel counts 0..16 (see image_to_digit)."""
    return image_to_digit(open_image(path), crop=crop)


def digit_to_png(pixels: torch.Tensor, path: str | Path, scale: int = 1, invert: bool = False) -> None:
    """Write an (8, 8) 0..16 digit as a grayscale PNG (each pixel scale x scale); invert: dark ink on white."""
    from PIL import Image
    v = torch.round(pixels.float() * 255 / PIXEL_MAX).clamp(0, 255).to(torch.uint8)
    if invert:
        v = 255 - v
    img = Image.frombytes("L", (v.shape[1], v.shape[0]), v.numpy().tobytes())
    if scale > 1:
        img = img.resize((v.shape[1] * scale, v.shape[0] * scale), Image.Resampling.NEAREST)
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
