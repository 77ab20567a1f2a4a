"""`picochat vlm train` end to end on a tiny model: exact resume, results.json, and chatting about a picture."""
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from picochat import cli
from picochat.errors import PicochatError

TINY = ["--train-scenes", "30", "--val-scenes", "8", "--test-scenes", "8", "--vocab-size", "300",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "256", "--vit-layers", "1",
        "--vit-heads", "2", "--vit-embd", "32", "--val-questions", "12", "--examples", "2", "--batch-size", "8",
        "--warmup-steps", "2", "--eval-every", "3", "--ckpt-every", "3", "--log-every", "1", "--max-steps", "6",
        "--vit-pretrain-steps", "3", "--no-progress"]


def weights(run: Path) -> dict:
    ckpt = run / (run / "latest").read_text().strip()
    return load_file(str(ckpt / "model.safetensors")) | {f"vision.{k}": v for k, v in
                                                          load_file(str(ckpt / "vision.safetensors")).items()}


def losses(run: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("vlm") / "run"
    assert cli.main(["vlm", "train", "--out-dir", str(run), *TINY]) == 0
    return run


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(trained, tmp_path, monkeypatch):
    from picochat.train.loop import Trainer
    cut = tmp_path / "cut"
    real = Trainer.train_step

    def dies_after_the_step_3_checkpoint(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", dies_after_the_step_3_checkpoint)
    assert cli.main(["vlm", "train", "--out-dir", str(cut), *TINY]) == 130
    assert (cut / "latest").read_text().strip().endswith("step_0000003")
    monkeypatch.setattr(Trainer, "train_step", real)
    assert cli.main(["vlm", "train", "--out-dir", str(cut), "--resume", *TINY]) == 0
    a, b = weights(trained), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(trained) == losses(cut)
    other = ["--data-seed", "1" if "--data-seed" not in TINY else "2"]
    assert cli.main(["vlm", "train", "--out-dir", str(cut), "--resume", *TINY, *other, "--max-steps", "7"]) == 2


@pytest.mark.slow
def test_results_hold_accuracy_per_type_beside_the_baselines(trained):
    r = json.loads((trained / "results.json").read_text())
    assert set(r["test"]["per_type"]) == {"digit", "count", "colour", "left", "which_left", "caption"}
    assert r["test"]["n"] == sum(v["n"] for v in r["test"]["per_type"].values())
    assert {"majority_per_type", "text_only_best"} <= set(r["baselines"])
    assert 0.0 < r["baselines"]["text_only_best"]["accuracy"] < 0.5
    assert (trained / "accuracy.png").stat().st_size > 0 and (trained / "loss.png").is_file()
    assert all((trained / e["file"]).is_file() for e in r["examples"])
    ckpt = trained / (trained / "latest").read_text().strip()
    assert json.loads((ckpt / "config.json").read_text())["vision"]["image_token"] == "<|image|>"


@pytest.mark.slow
def test_chat_about_a_picture_and_every_bad_picture_is_one_error(trained, tmp_path, capsys):
    from picochat.chat import ChatConfig, chat
    from picochat.checkpoints.io import load_model, save_model
    example = trained / json.loads((trained / "results.json").read_text())["examples"][0]["file"]
    lines = iter(["Which digit is this?", "/image nowhere.png", f"/image {example}", "Describe the picture.", "/quit"])
    out = io.StringIO()
    chat(ChatConfig(model=str(trained), image=str(example), temperature=0, max_tokens=8, repetition_penalty=None),
         input_fn=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "sees 9-token images" in text and "attached to your first message" in text, text
    assert "error: no image at nowhere.png" in text and f"{example} attached to your next message" in text
    # bad input: one line on stderr, exit 2, nothing shown or started
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "cut.png").write_bytes(example.read_bytes()[:100])
    gpt, tok, _ = load_model(trained)
    save_model(gpt, tmp_path / "textonly", tok)  # the same GPT without its eyes
    for model, image, why in ((trained, tmp_path / "notes.txt", "not an image"),
                              (trained, tmp_path / "cut.png", "corrupt or truncated"),
                              (tmp_path / "textonly", example, "text-only model")):
        capsys.readouterr()
        assert cli.main(["chat", str(model), "--image", str(image)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and why in captured.err and captured.err.count("\n") == 1, captured


def test_the_text_half_of_a_multimodal_checkpoint_loads_as_a_gpt(tmp_path):
    from picochat.chat_template import IMAGE_TOKEN
    from picochat.checkpoints.io import load_model
    from picochat.checkpoints.vlm import load_image_encoder, load_vlm, save_vlm
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    from picochat.model.multimodal import VLM, ImageEncoder, VisionConfig
    from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer
    tok = Tokenizer.train(["which digit is this? 7 " * 20], 280, special_tokens=SPECIAL_TOKENS + [IMAGE_TOKEN])
    torch.manual_seed(0)
    vc = VisionConfig(vit=dict(image_size=24, channels=3, patch_size=4, n_layer=1, n_head=2, n_embd=16), lm_width=32)
    vlm = VLM(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)),
              ImageEncoder(vc), tok.special_tokens[IMAGE_TOKEN])
    save_vlm(vlm, tmp_path / "ckpt", tok)
    gpt, tok2, _ = load_model(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), vlm.gpt.state_dict().values()))
    enc = load_image_encoder(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), vlm.vision.state_dict().values()))
    assert load_image_encoder("smollm2") is None
    (tmp_path / "ckpt" / "vision.safetensors").write_bytes(b"broken")
    with pytest.raises(PicochatError, match="corrupt"):
        load_vlm(tmp_path / "ckpt")


def test_the_pretrained_vit_trains_at_its_fraction_of_the_learning_rate(trained):
    ckpt = trained / (trained / "latest").read_text().strip()
    groups = json.loads((ckpt / "state.json").read_text())["param_groups"]
    by_mult = {g["lr_mult"]: g["lr"] for g in groups}
    assert set(by_mult) == {1.0, 0.1}
    assert by_mult[0.1] == pytest.approx(0.1 * by_mult[1.0])
    assert json.loads((trained / "results.json").read_text())["vision_pretraining"]["steps"] == 3


def test_stage_one_teaches_the_vit_what_lies_under_each_patch():
    from picochat.data import scenes as S
    from picochat.model.vit import ViT, ViTConfig
    from picochat.vision.patches import pretrain_patches
    torch.set_num_threads(1)
    sets = S.make_splits(0, 300, 60, 1)
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=24, channels=3, patch_size=4, n_layer=2, n_head=2, n_embd=48, num_classes=2,
                        pool="mean"))
    got = pretrain_patches(vit, sets["train"], sets["val"], steps=200, batch_size=32)
    # always "background" scores background_share; the trained ViT must find the shapes' patches too
    assert got["val_patch_accuracy"] > got["background_share"] + 0.25 * (1 - got["background_share"]), got


def test_the_vit_lr_factor_defaults_by_stage_and_a_given_one_is_kept():
    from picochat.train.vlm import VLMTrainConfig
    assert VLMTrainConfig().vit_lr_mult == 0.1                       # after stage 1
    assert VLMTrainConfig(vit_pretrain_steps=0).vit_lr_mult == 1.0   # a ViT that has learnt nothing yet
    assert VLMTrainConfig(vit_pretrain_steps=0, vit_lr_mult=0.5).vit_lr_mult == 0.5
    with pytest.raises(PicochatError, match="vit-lr-mult"):
        VLMTrainConfig(vit_lr_mult=-1)
