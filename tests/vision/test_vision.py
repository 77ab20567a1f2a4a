"""`picochat vision`: the fixed split, a short run with exact resume, predict on pictures, and bad input."""
import json
import shutil

import pytest
import torch

from picochat.cli import main
from picochat.errors import PicochatError
from picochat.vision import data as D
from picochat.vision.cli import PredictConfig, predict
from picochat.vision.train import VisionTrainConfig, load_vision, vision_train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return D.load_digits()


def test_split_is_fixed_stratified_and_disjoint(digits):
    _, labels = digits
    s = D.split_digits(labels)
    train, val, test = (set(s[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and train | val | test == set(range(1797))
    assert (len(train), len(val), len(test)) == (1259, 179, 359)
    for k in range(10):  # every digit is held out in proportion
        n = int((labels == k).sum())
        assert abs(int((labels[s["test"]] == k).sum()) - 0.2 * n) <= 0.5
    assert D.split_digits(labels) == s and D.split_digits(labels, seed=1)["test"] != s["test"]
    # the README's numbers are measured on exactly these test images
    assert D.split_fingerprint(s["test"]) == "540ab0bd665145f5"
    with pytest.raises(PicochatError, match="fraction"):
        D.split_digits(labels, 0.5, 0.4)


def test_affine_turns_scales_and_moves_as_documented():
    import math
    x = torch.rand(3, 1, 8, 8)
    zero, one = torch.zeros(3), torch.ones(3)
    assert torch.allclose(D.affine(x, zero, one, torch.zeros(3, 2)), x, atol=1e-6)
    assert torch.allclose(D.affine(x, zero + math.pi / 2, one, torch.zeros(3, 2)), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 1, 5] = 1  # row 1, column 5
    moved = D.affine(dot, torch.zeros(1), torch.ones(1), torch.tensor([[1.0, 2.0]]))  # 1 right, 2 down
    assert torch.nonzero(moved > 0.999).tolist() == [[0, 0, 3, 6]] and math.isclose(moved.sum().item(), 1, abs_tol=1e-5)
    turned_then_moved = D.affine(dot, torch.tensor([math.pi / 2]), torch.ones(1), torch.tensor([[1.0, 2.0]]))
    assert torch.nonzero(turned_then_moved > 0.999).tolist() == [[0, 0, 4, 2]]  # rot90 puts it at (2, 1)
    big = D.affine(dot, torch.zeros(1), torch.tensor([2.0]), torch.zeros(1, 2))  # twice as far from the centre
    assert big[0, 0, 1:].sum() == 0 and big[0, 0, 0, 5:].sum() > 0


def test_random_affine_is_seeded_bounded_and_varied(digits):
    x = D.to_model_input(digits[0][:64])
    assert torch.equal(D.random_affine(x, 0, 0, 0, torch.Generator()), x)
    a = D.random_affine(x, 10, 0.1, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a, D.random_affine(x, 10, 0.1, 0.5, torch.Generator().manual_seed(5)))  # resume needs it
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    change = (a - x).abs().flatten(1).mean(1)
    assert bool((change > 0).all()) and change.std() > 0  # every image moved, each its own way
    ink = a.flatten(1).sum(1) / x.flatten(1).sum(1)
    assert bool(((ink > 0.7) & (ink < 1.3)).all())  # light: the digit stays in the picture


def test_pictures_become_dataset_digits(digits, tmp_path):
    images, _ = digits
    i = next(k for k in range(len(images)) if images[k].max() == 16)
    D.digit_to_png(images[i], tmp_path / "a.png")                        # as is: bright ink on black, 8x8
    D.digit_to_png(images[i], tmp_path / "b.png", scale=6, invert=True)  # dark ink on white, 48x48
    for name in ("a.png", "b.png"):
        assert torch.equal(D.read_digit(tmp_path / name, crop=False), images[i]), name
    cropped = D.read_digit(tmp_path / "b.png")  # crop: the ink's box, centred; still 8x8 of 0..16 integers
    assert cropped.shape == (8, 8) and cropped.max() == 16 and torch.equal(cropped, cropped.round())
    from PIL import Image  # a JPEG photo-like picture: grey paper, transparency and colour are handled too
    big = Image.open(tmp_path / "b.png").convert("RGB").resize((96, 96))
    big.point(lambda v: int(v * 0.8 + 30)).save(tmp_path / "c.jpg", quality=95)
    assert (D.read_digit(tmp_path / "c.jpg", crop=False) - images[i]).abs().max() <= 2
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (18, 5, 22, 35))  # a black bar on a transparent background: a "1"
    rgba.save(tmp_path / "d.png")
    one = D.read_digit(tmp_path / "d.png")
    assert one[:, 3:5].min() == 16 and one[:, :2].max() == 0


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A ViT trained for 6 steps (tiny, far from good): for the plumbing, not the quality."""
    out = tmp_path_factory.mktemp("vision") / "run"
    argv = ["vision", "train", "--out-dir", str(out), "--max-steps", "6", "--batch-size", "16", "--n-embd", "16",
            "--n-head", "2", "--n-layer", "1", "--eval-every", "3", "--ckpt-every", "3", "--log-every", "1",
            "--warmup-steps", "2", "--no-progress", "--dtype", "fp32"]
    assert main(argv) == 0
    return out, argv


def test_short_run_writes_everything_and_resumes_exactly(short_run, tmp_path, capsys):
    out, argv = short_run
    results = json.loads((out / "results.json").read_text())
    assert results["test_n"] == 359 and 0 <= results["test_accuracy"] <= 1
    assert results["baseline"]["test_accuracy"] > 0.95 and "gamma='scale'" in results["baseline"]["name"]
    assert results["baseline_classic"]["test_accuracy"] > 0.95
    assert results["split"]["test_fingerprint"] == "540ab0bd665145f5" and results["train_seconds"] > 0
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [3, 6]
    ckpt6 = out / "checkpoints" / "step_0000006"
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000006"
    assert {p.name for p in ckpt6.iterdir()} >= {"config.json", "model.safetensors", "optimizer.safetensors",
                                                 "state.json"}
    # kill after step 3: the copy's latest checkpoint is step 3; resuming must give step 6's weights exactly
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000006")
    (cut / "latest").write_text("checkpoints/step_0000003\n")
    assert main([*argv[:3], str(cut), *argv[4:], "--resume"]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(ckpt6 / "model.safetensors")), load_file(str(cut / "checkpoints/step_0000006/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((cut / "results.json").read_text())
    assert again["test_errors"] == results["test_errors"] and again["resumed_from_step"] == 3
    rows2 = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows2 if "loss" in r] == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    capsys.readouterr()
    with pytest.raises(PicochatError, match="another model"):
        vision_train(VisionTrainConfig(out_dir=str(cut), max_steps=8, n_embd=32, n_head=2, n_layer=1, resume=True,
                                       progress=False))
    with pytest.raises(PicochatError, match="another split"):
        vision_train(VisionTrainConfig(out_dir=str(cut), max_steps=8, n_embd=16, n_head=2, n_layer=1, resume=True,
                                       progress=False, split_seed=3, batch_size=16))


def test_predict_on_a_png_gives_the_models_label_on_the_array(short_run, digits, tmp_path, capsys):
    out, _ = short_run
    images, _ = digits
    model, task, _ = load_vision(out)
    picks = [k for k in range(40) if images[k].max() == 16][:6]
    paths = []
    for k in picks:
        D.digit_to_png(images[k], tmp_path / f"{k}.png", scale=4, invert=k % 2 == 0)
        paths.append(str(tmp_path / f"{k}.png"))
    with torch.no_grad():
        probs = torch.softmax(model(D.to_model_input(images[picks]))[0], -1)
    capsys.readouterr()
    got = predict(PredictConfig(model=str(out), images=paths, crop=False))
    assert [g["digit"] for g in got] == [task["labels"][int(p.argmax())] for p in probs]
    for g, p in zip(got, probs):
        assert [g["probabilities"][str(k)] for k in range(10)] == pytest.approx(p.tolist(), abs=1e-4)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].startswith(f"{paths[0]}: {got[0]['digit']}  (")
    assert main(["vision", "predict", str(out), paths[1], "--no-crop", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digit"] == got[1]["digit"]


def one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert match.lower() in err[0].lower(), err[0]


def test_bad_pictures_get_one_clear_line(short_run, digits, tmp_path, capsys):
    from PIL import Image
    out, _ = short_run
    good = tmp_path / "good.png"
    D.digit_to_png(digits[0][0], good)
    run = ["vision", "predict", str(out)]
    (tmp_path / "notes.png").write_text("not a picture at all\n")
    one_line_error(capsys, [*run, str(good), str(tmp_path / "notes.png")], "is not an image pillow can read")
    assert "good.png" not in capsys.readouterr().out  # nothing is predicted before every picture is read
    noise = Image.frombytes("L", (64, 64), bytes(torch.randint(0, 256, (64 * 64,)).to(torch.uint8).tolist()))
    noise.save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    one_line_error(capsys, [*run, str(tmp_path / "cut.png")], "corrupt or truncated PNG")
    Image.new("1", (4100, 4100)).save(tmp_path / "huge.png")
    one_line_error(capsys, [*run, str(tmp_path / "huge.png")], "4100x4100 pixels; images up to 16,777,216 pixels")
    with open(tmp_path / "heavy.png", "wb") as f:
        f.truncate(21 * 2**20)  # sparse: 21 MB on paper
    one_line_error(capsys, [*run, str(tmp_path / "heavy.png")], "21.0 MB; images up to 20 MB")
    Image.new("L", (8, 8)).save(tmp_path / "anim.gif")
    one_line_error(capsys, [*run, str(tmp_path / "anim.gif")], "is a GIF image; give a PNG or JPEG")
    Image.new("L", (30, 30), 200).save(tmp_path / "blank.png")
    one_line_error(capsys, [*run, str(tmp_path / "blank.png")], "blank")
    one_line_error(capsys, [*run, str(tmp_path / "nowhere.png")], "no image at")
    one_line_error(capsys, [*run, str(tmp_path)], "is not a file")
    one_line_error(capsys, run, "give one or more PNG or JPEG images")
    one_line_error(capsys, [*run, str(good), "--top", "11"], "--top")


def test_models_that_are_not_vision_runs_get_one_clear_line(tmp_path, digits, capsys):
    good = tmp_path / "good.png"
    D.digit_to_png(digits[0][0], good)
    one_line_error(capsys, ["vision", "predict", str(tmp_path / "nowhere"), str(good)], "no vision model at")
    from picochat.checkpoints.io import save_model
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    gpt = save_model(GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)), tmp_path / "gpt")
    one_line_error(capsys, ["vision", "predict", str(gpt), str(good)], "is not a vision model")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["vision", "predict", str(tmp_path / "empty"), str(good)], "is not a vision run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("checkpoints/step_0000009\n")
    one_line_error(capsys, ["vision", "predict", str(tmp_path / "run"), str(good)], "missing")
    one_line_error(capsys, ["vision", "predict", str(good), str(good)], "is not a vision run")


@pytest.mark.parametrize("args,match", [(["--patch-size", "3"], "does not tile"), (["--rotate", "200"], "--rotate 200"),
                                        (["--pos", "sinusoidal", "--n-embd", "18", "--n-head", "2"], "multiple of 4"),
                                        (["--test-fraction", "0.9"], "fraction"), (["--lr", "2"], "--lr")])
def test_training_mistakes_are_refused_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    one_line_error(capsys, ["vision", "train", "--out-dir", str(out), *args], match)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["vision", "--help"], ["vision", "train", "--help"], ["vision", "predict", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: picochat vision" in capsys.readouterr().out


@pytest.mark.slow
def test_a_short_training_reads_held_out_digits_and_pictures_of_them(tmp_path, digits):
    """~40 s: the default model for 600 steps (a quarter of the default run) already reads >= 96% of the test
    digits, and pictures of them (dark ink on white, 48x48, off-centre on a page) through the crop."""
    from PIL import Image
    out = tmp_path / "run"
    r = vision_train(VisionTrainConfig(out_dir=str(out), max_steps=600, eval_every=600, ckpt_every=600,
                                       progress=False))
    assert r["test_accuracy"] >= 0.96 and r["baseline"]["test_accuracy"] >= 0.97, r
    images, labels = digits
    test = D.split_digits(labels)["test"][::6]  # 60 of them
    paths = []
    for i in test:
        D.digit_to_png(images[i], tmp_path / "d.png", scale=6, invert=True)
        page = Image.new("L", (120, 90), 255)
        page.paste(Image.open(tmp_path / "d.png"), (50 - i % 40, 10 + i % 30))
        page.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    got = predict(PredictConfig(model=str(out), images=paths))
    right = sum(g["digit"] == str(int(labels[i])) for g, i in zip(got, test))
    assert right >= 0.93 * len(test), right
