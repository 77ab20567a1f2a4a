"""Pictures with questions whose answers can be checked exactly: the multimodal chat model's data.

Two kinds of 24 x 24 RGB images (small enough for a CPU; 24 = 3 x 8 so a digit scales by a whole number):

    digits   scikit-learn's 8x8 digits (1,797, bundled), each pixel a 3x3 block (NEAREST), gray ink on white:
             v = 255 - round(255 * count / 16). The split is picochat vision's (vision/data.split_digits:
             stratified, seed 0 -> 1,259 train / 179 val / 359 test), so its test digits are held out here too.
    scenes   1-3 shapes of distinct kinds (circle, square, triangle), each red, green, blue or yellow, 5-7 px,
             on white. Their x-extents never overlap (a gap of at least 1 px), so "left of" is exact.
             Drawn at 4x (96 x 96) and averaged down (BOX filter), so edges are anti-aliased the way a
             user's larger picture is once resized to 24 x 24 (``image_to_input``).

Questions (type: question -> answer), one phrasing each:

    digit       Which digit is this? -> 7
    count       How many shapes are there? -> 2
    colour      What colour is the circle? -> red       (a shape not in the picture: there is no circle)
    left        Is the circle left of the square? -> yes | no          (every ordered pair present)
    which_left  Which is further left, the circle or the square? -> the circle   (both orders)
    caption     Describe the picture. -> a red circle and a blue square  (left to right; digits: a handwritten 7)

Splits are by image: scenes of split s come from random.Random(f"{seed}:scenes:{s}"), and a val/test scene
whose pixels equal a training scene's is dropped, so no held-out image is ever trained on. Everything is a
pure function of (seed, sizes): the same call gives the same bytes (``fingerprint``).
"""
from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import PicochatError

IMAGE_SIZE, CHANNELS, RENDER_SCALE = 24, 3, 4
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 195, 20)}
BACKGROUND = (255, 255, 255)
SIZES, GAP = (5, 6, 7), 1
QUESTION_TYPES = ("digit", "count", "colour", "left", "which_left", "caption")
DESCRIBE = "Describe the picture."
MAX_FILE_BYTES = 20 * 1024 * 1024   # 20 MB: refused before decoding
MAX_PIXELS = 4096 * 4096            # refused from the header, before decoding
FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class Shape:
    kind: str      # one of SHAPES
    colour: str    # one of COLOURS
    x: int         # left edge, pixels of the 24 x 24 image
    y: int         # top edge
    size: int      # side of its bounding box


@dataclass(frozen=True)
class QA:
    image: int     # row of the split's image tensor
    type: str      # one of QUESTION_TYPES
    question: str
    answer: str


@dataclass
class SceneSet:
    """One split: images (M, 3, 24, 24) uint8, and questions that point into them."""
    images: torch.Tensor
    qa: list[QA]
    sources: list[str]   # per image: "digit:<index in load_digits>" or "scene:<n>"
    shapes: list[tuple] = ()  # per image: its Shapes, left to right (() for a digit)

    def fingerprint(self) -> str:
        """16 hex digits over the pixels and every question and answer: equal sets, equal fingerprints."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        for q in self.qa:
            h.update(f"{q.image}\t{q.type}\t{q.question}\t{q.answer}\n".encode())
        return h.hexdigest()[:16]

    def by_type(self) -> dict[str, list[QA]]:
        out: dict[str, list[QA]] = {t: [] for t in QUESTION_TYPES}
        for q in self.qa:
            out[q.type].append(q)
        return out


# ---- scenes -------------------------------------------------------------------------------------------
def random_scene(rng: random.Random) -> list[Shape]:
    """1-3 shapes of distinct kinds, left to right. The free width is cut at random points into the
    gaps before, between and after them, so every layout fits without retries."""
    k = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, k)
    sizes = [rng.choice(SIZES) for _ in range(k)]
    free = IMAGE_SIZE - sum(sizes) - GAP * (k - 1)
    cuts = sorted(rng.randint(0, free) for _ in range(k))   # x of shape i = cuts[i] + width of what is left of it
    shapes, left = [], 0
    for i in range(k):
        y = rng.randint(0, IMAGE_SIZE - sizes[i])
        shapes.append(Shape(kinds[i], rng.choice(list(COLOURS)), cuts[i] + left, y, sizes[i]))
        left += sizes[i] + GAP
    return shapes


def render_scene(shapes: list[Shape]) -> torch.Tensor:
    """-> (3, 24, 24) uint8: drawn at RENDER_SCALE x and averaged down (anti-aliased edges)."""
    from PIL import Image, ImageDraw
    s = RENDER_SCALE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for sh in shapes:
        x0, y0, x1, y1 = sh.x * s, sh.y * s, (sh.x + sh.size) * s - 1, (sh.y + sh.size) * s - 1
        fill = COLOURS[sh.colour]
        if sh.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif sh.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # apex at the top centre, base along the bottom
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return _to_tensor(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def render_digit(pixels: torch.Tensor) -> torch.Tensor:
    """(8, 8) counts 0..16 -> (3, 24, 24) uint8: gray ink on white, each pixel a 3 x 3 block."""
    v = (255 - torch.round(pixels.float() * 255 / 16)).clamp(0, 255).to(torch.uint8)  # (8, 8)
    k = IMAGE_SIZE // v.size(0)
    return v.repeat_interleave(k, 0).repeat_interleave(k, 1).unsqueeze(0).expand(CHANNELS, -1, -1).contiguous()


def caption(shapes: list[Shape]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a red circle, a blue square and a green triangle'."""
    parts = [f"a {sh.colour} {sh.kind}" for sh in sorted(shapes, key=lambda sh: sh.x)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_questions(shapes: list[Shape]) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every question the scene answers exactly."""
    by_kind = {sh.kind: sh for sh in shapes}
    out = [("count", "How many shapes are there?", str(len(shapes)))]
    for kind in SHAPES:
        answer = by_kind[kind].colour if kind in by_kind else f"there is no {kind}"
        out.append(("colour", f"What colour is the {kind}?", answer))
    for a in shapes:
        for b in shapes:
            if a is b:
                continue
            out.append(("left", f"Is the {a.kind} left of the {b.kind}?", "yes" if a.x < b.x else "no"))
            out.append(("which_left", f"Which is further left, the {a.kind} or the {b.kind}?",
                        f"the {a.kind if a.x < b.x else b.kind}"))
    out.append(("caption", DESCRIBE, caption(shapes)))
    return out


def digit_questions(label: int) -> list[tuple[str, str, str]]:
    return [("digit", "Which digit is this?", str(label)), ("caption", DESCRIBE, f"a handwritten {label}")]


# ---- splits -------------------------------------------------------------------------------------------
def make_splits(seed: int = 0, train_scenes: int = 4000, val_scenes: int = 300, test_scenes: int = 600,
                split_seed: int = 0) -> dict[str, SceneSet]:
    """{"train", "val", "test"}: digits split as picochat vision does (split_seed), scenes generated from
    seed; val and test scenes identical to a training scene (or to one another) are dropped."""
    from ..vision.data import load_digits, split_digits
    digits, labels = load_digits()
    digit_split = split_digits(labels, seed=split_seed)
    seen: set[bytes] = set()
    out = {}
    for split, n in (("train", train_scenes), ("val", val_scenes), ("test", test_scenes)):
        images, qa, sources, layouts = [], [], [], []
        for i in digit_split[split]:
            for t, q, a in digit_questions(int(labels[i])):
                qa.append(QA(len(images), t, q, a))
            images.append(render_digit(digits[i]))
            sources.append(f"digit:{i}")
            layouts.append(())
        rng = random.Random(f"{seed}:scenes:{split}")
        for n_scene in range(n):
            shapes = random_scene(rng)
            img = render_scene(shapes)
            key = img.numpy().tobytes()
            if split != "train" and key in seen:  # held out means never trained on: not even by chance
                continue
            seen.add(key)
            for t, q, a in scene_questions(shapes):
                qa.append(QA(len(images), t, q, a))
            images.append(img)
            sources.append(f"scene:{n_scene}")
            layouts.append(tuple(shapes))
        out[split] = SceneSet(torch.stack(images), qa, sources, layouts)
    return out


# ---- what lies under each patch: the vision encoder's first lesson ----------------------------------------
PATCH_CLASSES = 1 + len(SHAPES) * len(COLOURS)   # 0 = background, 1 + kind * 4 + colour


def patch_classes(shapes: list[Shape], patch: int) -> torch.Tensor:
    """(G*G,) long, G = IMAGE_SIZE / patch, raster order: the class of the shape covering most of each patch
    (1 + kind index * len(COLOURS) + colour index), or 0 if shapes cover under 3/16 of its pixels.
    A pixel belongs to the shape whose own rendering inks it most (at least 30%: anti-aliased rims count)."""
    g = IMAGE_SIZE // patch
    cls = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    best = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    for sh in shapes:
        ink = (255 - render_scene([sh]).float().min(0).values) / 255           # (24, 24) in [0, 1]
        mine = (ink > 0.3) & (ink > best)
        cls[mine] = 1 + SHAPES.index(sh.kind) * len(COLOURS) + list(COLOURS).index(sh.colour)
        best[mine] = ink[mine]
    counts = torch.nn.functional.one_hot(cls, PATCH_CLASSES).view(g, patch, g, patch, -1).sum((1, 3))  # (g, g, K)
    shape_px = counts[..., 1:].sum(-1)
    counts[..., 0] = torch.where(shape_px * 16 >= 3 * patch * patch, 0, patch * patch + 1)  # background wins if sparse
    return counts.argmax(-1).reshape(-1)


def text_corpus(sets: dict[str, SceneSet]) -> list[str]:
    """Every question and answer of the training split (what the tokenizer is trained on)."""
    return [f"{q.question}\n{q.answer}" for q in sets["train"].qa]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 24, 24) uint8 -> float in [0, 1], what the vision encoder reads."""
    return images.float() / 255.0


# ---- a user's picture ---------------------------------------------------------------------------------
def _to_tensor(img) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def open_image(source: str | Path | bytes, name: Optional[str] = None):
    """A PNG or JPEG (a path, or the file's bytes: the server's data: URLs) -> a decoded Pillow image,
    or one PicochatError: missing, over MAX_FILE_BYTES or MAX_PIXELS, not PNG/JPEG, corrupt or truncated."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), name or "the image"
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise PicochatError(f"no image at {path}" if not path.exists() else f"{path} is not a file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PicochatError(f"{name} is {path.stat().st_size / 2**20:.1f} MB; images up to "
                                f"{MAX_FILE_BYTES // 2**20} MB are read: shrink it")
        data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        raise PicochatError(f"{name} is {len(data) / 2**20:.1f} MB; images up to {MAX_FILE_BYTES // 2**20} MB "
                            "are read: shrink it")
    try:
        img = Image.open(io.BytesIO(data))  # the header only
    except UnidentifiedImageError:
        raise PicochatError(f"{name} is not an image Pillow can read; give a PNG or JPEG file") from None
    except (Image.DecompressionBombError, OSError, ValueError) as e:
        raise PicochatError(f"cannot read {name} ({e}); give a PNG or JPEG of at most 4096x4096 pixels") from None
    if img.format not in FORMATS:
        raise PicochatError(f"{name} is a {img.format} image; give a PNG or JPEG file")
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise PicochatError(f"{name} is {w}x{h} pixels; images up to {MAX_PIXELS:,} pixels (4096x4096) are "
                            "read: shrink it")
    try:
        img.load()  # decodes: a truncated or damaged file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PicochatError(f"{name} is a corrupt or truncated {img.format} file ({e}); save it again") from None
    return img


def image_to_input(img, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A Pillow image -> (3, size, size) uint8 like the training images: EXIF orientation applied,
    transparency over white, padded with white to a square (centred; shapes keep their proportions),
    averaged down to size x size (BOX: each pixel the mean of its block)."""
    from PIL import Image
    return _to_tensor(square_on_white(img).resize((size, size), Image.Resampling.BOX))


def square_on_white(img):
    """A Pillow image -> an RGBA square at full resolution, as the model frames every picture: EXIF orientation
    applied, transparency over white, padded with white to a centred square (the page draws over this)."""
    from PIL import Image, ImageOps
    rgba = ImageOps.exif_transpose(img).convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), BACKGROUND + (255,))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas


def read_image(source: str | Path | bytes, name: Optional[str] = None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A PNG/JPEG file or its bytes -> (3, size, size) uint8 (open_image, then image_to_input)."""
    return image_to_input(open_image(source, name), size)


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a (3, H, W) uint8 image as PNG (each pixel scale x scale), atomically."""
    from PIL import Image
    from ..fsutil import atomic_write
    img = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return Path(path)
