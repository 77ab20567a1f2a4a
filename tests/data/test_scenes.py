"""The multimodal data: deterministic, held out by image, answers that the pixels bear out; bad pictures refused."""
import io
import random

import pytest
import torch

from picochat.data import scenes as S
from picochat.errors import PicochatError


@pytest.fixture(scope="module")
def sets():
    return S.make_splits(seed=3, train_scenes=150, val_scenes=40, test_scenes=60)


def test_same_seed_same_bytes_other_seed_other_scenes(sets):
    again = S.make_splits(seed=3, train_scenes=150, val_scenes=40, test_scenes=60)
    assert {k: v.fingerprint() for k, v in sets.items()} == {k: v.fingerprint() for k, v in again.items()}
    other = S.make_splits(seed=4, train_scenes=150, val_scenes=40, test_scenes=60)
    assert other["train"].fingerprint() != sets["train"].fingerprint()
    assert sets["train"].images.shape[1:] == (S.CHANNELS, S.IMAGE_SIZE, S.IMAGE_SIZE)
    assert sets["train"].images.dtype == torch.uint8


def test_held_out_pictures_are_never_training_pictures(sets):
    train = {img.numpy().tobytes() for img in sets["train"].images}
    for split in ("val", "test"):
        assert not any(img.numpy().tobytes() in train for img in sets[split].images)
    digits = {split: {s for s in sets[split].sources if s.startswith("digit")} for split in sets}
    assert not digits["train"] & digits["test"] and not digits["train"] & digits["val"]
    assert len(digits["test"]) == 359  # picochat vision's held-out digits


def test_every_question_type_is_asked_and_answers_are_short_and_exact(sets):
    by_type = sets["test"].by_type()
    assert all(by_type[t] for t in S.QUESTION_TYPES)
    assert {q.answer for q in by_type["digit"]} == {str(d) for d in range(10)}
    assert {q.answer for q in by_type["count"]} == {"1", "2", "3"}
    assert {q.answer for q in by_type["left"]} == {"yes", "no"}
    assert {q.answer for q in by_type["colour"]} <= set(S.COLOURS) | {f"there is no {k}" for k in S.SHAPES}


def test_answers_are_borne_out_by_the_pixels():
    rng = random.Random(0)
    for _ in range(200):
        shapes = S.random_scene(rng)
        img = S.render_scene(shapes).int()  # (3, 24, 24)
        xs = sorted(sh.x for sh in shapes)
        for sh in shapes:  # the centre pixel has the shape's colour; x-extents never overlap
            cy, cx = sh.y + sh.size // 2, sh.x + sh.size // 2
            assert (img[:, cy, cx] - torch.tensor(S.COLOURS[sh.colour])).abs().max() <= 40, sh
            assert 0 <= sh.x and sh.x + sh.size <= S.IMAGE_SIZE and 0 <= sh.y and sh.y + sh.size <= S.IMAGE_SIZE
        for a, b in zip(xs, xs[1:]):
            left = next(sh for sh in shapes if sh.x == a)
            assert a + left.size + S.GAP <= b
        ink = (img < 250).any(0)  # (24, 24): columns with ink are exactly the shapes' extents
        cols = set(torch.nonzero(ink.any(0)).flatten().tolist())
        assert cols <= {c for sh in shapes for c in range(sh.x, sh.x + sh.size)}
        qa = {q: a for _, q, a in S.scene_questions(shapes)}
        assert qa["How many shapes are there?"] == str(len(shapes))
        order = [sh.kind for sh in sorted(shapes, key=lambda sh: sh.x)]
        assert qa[S.DESCRIBE].split(" and ")[-1].endswith(order[-1])
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                assert qa[f"Is the {a} left of the {b}?"] == "yes" and qa[f"Is the {b} left of the {a}?"] == "no"
                assert qa[f"Which is further left, the {b} or the {a}?"] == f"the {a}"


def test_a_digit_is_its_8x8_pixels_in_3x3_blocks():
    pix = torch.arange(64, dtype=torch.float32).view(8, 8) % 17
    img = S.render_digit(pix)
    assert img.shape == (3, 24, 24) and torch.equal(img[0], img[2])
    assert int(img[0, 4, 7]) == 255 - round(255 * float(pix[1, 2]) / 16)


def png_bytes(w=30, h=20, fmt="PNG", colour=(200, 10, 10)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format=fmt)
    return buf.getvalue()


def test_a_users_picture_becomes_a_24x24_input_and_a_saved_example_reads_back_exactly(tmp_path):
    x = S.read_image(png_bytes())
    assert x.shape == (3, 24, 24) and int(x[0, 12, 12]) == 200 and int(x[0, 0, 12]) == 255  # padded with white
    assert S.read_image(png_bytes(fmt="JPEG")).shape == (3, 24, 24)
    img = S.render_scene(S.random_scene(random.Random(1)))
    S.save_png(img, tmp_path / "scene.png", scale=8)
    assert torch.equal(S.read_image(tmp_path / "scene.png"), img)


def test_bad_pictures_are_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(PicochatError, match="not an image"):
        S.read_image(tmp_path / "notes.txt")
    (tmp_path / "cut.png").write_bytes(png_bytes(64, 64)[:60])
    with pytest.raises(PicochatError, match="corrupt or truncated|cannot read"):
        S.read_image(tmp_path / "cut.png")
    with pytest.raises(PicochatError, match="no image at"):
        S.read_image(tmp_path / "missing.png")
    with pytest.raises(PicochatError, match="GIF"):
        S.read_image(png_bytes(fmt="GIF"))
    monkeypatch.setattr(S, "MAX_PIXELS", 100)
    with pytest.raises(PicochatError, match="4096x4096"):
        S.read_image(png_bytes(20, 20))
    monkeypatch.setattr(S, "MAX_FILE_BYTES", 50)
    (tmp_path / "big.png").write_bytes(png_bytes(64, 64))
    with pytest.raises(PicochatError, match="MB"):
        S.read_image(tmp_path / "big.png")


def test_each_patch_is_labelled_with_the_shape_covering_it():
    red, square = list(S.COLOURS).index("red"), S.SHAPES.index("square")
    # a 7 px red square at (4, 8): it fills pixels 4..10 x 8..15, so with 4 px patches it covers patch
    # columns 1 (pixels 4-7, 4 px wide) and 2 (8-10, 3 px) of rows 2 and 3 (8-11, 12-15, 4 px each)
    got = S.patch_classes([S.Shape("square", "red", 4, 8, 7)], 4).view(6, 6)
    want = torch.zeros(6, 6, dtype=torch.long)
    want[2:4, 1:3] = 1 + square * len(S.COLOURS) + red
    assert torch.equal(got, want)
    # two shapes: each its own class, and a patch the shapes barely touch stays background
    two = [S.Shape("circle", "blue", 0, 0, 6), S.Shape("triangle", "green", 12, 16, 7)]
    got = S.patch_classes(two, 4)
    assert set(got.tolist()) == {0, 1 + S.SHAPES.index("circle") * 4 + list(S.COLOURS).index("blue"),
                                 1 + S.SHAPES.index("triangle") * 4 + list(S.COLOURS).index("green")}
    assert got.view(6, 6)[0, 0] != 0 and got.view(6, 6)[5, 5] == 0


def test_splits_keep_each_pictures_shapes(sets):
    tr = sets["train"]
    for i, (src, shapes) in enumerate(zip(tr.sources, tr.shapes)):
        if src.startswith("digit"):
            assert shapes == ()
        else:
            assert torch.equal(S.render_scene(list(shapes)), tr.images[i])
