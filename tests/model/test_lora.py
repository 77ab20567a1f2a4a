"""LoRA (picochat/model/lora.py): equal to the base before training, only adapters train, merge is exact
and happens once, adapters save small and load through every verb."""
import copy

import pytest
import torch

from picochat.cli import main
from picochat.checkpoints.io import load_model, save_model
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.lora import (LoraConfig, LoraLinear, add_lora, has_lora, is_adapter, load_adapter_model,
                                 load_lora_state, lora_state_dict, merge_lora, save_adapter, target_map)
from picochat.model.quant import quantize_int8

VOCAB = 300


def llama_like(**kw):  # SwiGLU, RoPE, GQA, RMSNorm, tied embeddings
    return ModelConfig(**(dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                               pos="rope", norm="rmsnorm", activation="swiglu") | kw))


def gpt2_like(**kw):  # GELU, learned positions, LayerNorm, biases, tied embeddings
    return ModelConfig(**(dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64, pos="learned",
                               norm="layernorm", activation="gelu_tanh", bias=True) | kw))


CONFIGS = {"llama": llama_like, "gpt2": gpt2_like, "llama-untied": lambda: llama_like(tie_embeddings=False)}


def all_targets(config):
    return tuple(target_map(config))  # every name this architecture has, lm_head included


def base_model(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config).eval()


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def train_steps(model, steps=4, seed=1):
    """A few real AdamW steps on random tokens, over the trainable parameters only."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 16), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_acceptance_equal_before_only_adapters_train_merge_exact_and_once(name):
    config = CONFIGS[name]()
    base = base_model(config)
    model = copy.deepcopy(base)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = logits(base, idx)
    wrapped = add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets=all_targets(config)))
    assert "lm_head" in wrapped and "blocks.1.attn.qkv_proj" in wrapped and "blocks.0.ffn.down_proj" in wrapped
    assert has_lora(model)
    # 1. before training: B = 0, so the adapted model is the base (every target, the LM head included)
    assert (logits(model, idx) - ref).abs().max() <= 1e-6
    # only A and B are trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable == set(lora_state_dict(model))
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    # 2. a few real steps: base tensors bit-identical, every adapter tensor changed
    assert torch.isfinite(torch.tensor(train_steps(model)))
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, frozen_before[k]), k
    for k, v in lora_state_dict(model).items():
        assert not torch.equal(v, lora_before[k]), k
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    adapted = logits(model, idx)
    assert (adapted - ref).abs().max() > 1e-4  # training did change the function
    # 3. merged == unmerged
    merge_lora(model)
    assert not has_lora(model) and not any(isinstance(m, LoraLinear) for m in model.modules())
    assert (logits(model, idx) - adapted).abs().max() <= 1e-5
    assert all(p.requires_grad for p in model.parameters())  # a plain model again
    # the tied head was untied by the merge; the input embedding kept E
    assert model.config.tie_embeddings is False
    assert model.lm_head.weight is not model.tok_emb.weight
    assert torch.equal(model.tok_emb.weight, base.tok_emb.weight)
    assert base.config.tie_embeddings == config.tie_embeddings  # the base's config was not touched
    # 4. merging twice is refused
    with pytest.raises(PicochatError, match="already merged"):
        merge_lora(model)


def test_tied_model_without_lm_head_target_stays_tied():
    model = base_model(llama_like())
    add_lora(model, LoraConfig(targets=("q", "v", "down")))
    assert model.lm_head.weight is model.tok_emb.weight
    train_steps(model, steps=2)
    merge_lora(model)
    assert model.config.tie_embeddings and model.lm_head.weight is model.tok_emb.weight


def test_slices_adapt_only_their_rows():
    """q on the fused qkv_proj changes only the query rows of W when merged; gate only the gate rows."""
    config = llama_like()
    model = base_model(config)
    w_qkv = model.blocks[0].attn.qkv_proj.weight.clone()
    w_up = model.blocks[0].ffn.up_proj.weight.clone()
    add_lora(model, LoraConfig(rank=2, targets="q,gate"))  # a comma-separated string works too
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_()
    merge_lora(model)
    q_rows, h = config.n_head * config.head_dim, config.ffn_hidden
    new_qkv, new_up = model.blocks[0].attn.qkv_proj.weight, model.blocks[0].ffn.up_proj.weight
    assert not torch.equal(new_qkv[:q_rows], w_qkv[:q_rows]) and torch.equal(new_qkv[q_rows:], w_qkv[q_rows:])
    assert not torch.equal(new_up[:h], w_up[:h]) and torch.equal(new_up[h:], w_up[h:])


def test_bad_targets_and_settings_are_refused_with_the_valid_list():
    with pytest.raises(PicochatError, match="valid targets: q,k,v,o,up,down,lm_head"):
        add_lora(base_model(gpt2_like()), LoraConfig(targets=("q", "gate")))
    with pytest.raises(PicochatError, match="valid targets: q,k,v,o,gate,up,down,lm_head"):
        add_lora(base_model(llama_like()), LoraConfig(targets=("qkv",)))
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=())):
        with pytest.raises(PicochatError):
            LoraConfig(**bad)
    model = base_model(llama_like())
    add_lora(model, LoraConfig())
    with pytest.raises(PicochatError, match="already has LoRA"):
        add_lora(model, LoraConfig())
    with pytest.raises(PicochatError, match="int8"):
        add_lora(quantize_int8(base_model(llama_like())), LoraConfig())


def test_load_lora_state_is_strict():
    model = base_model(llama_like())
    add_lora(model, LoraConfig(rank=4, targets=("q", "v")))
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    other = base_model(llama_like())
    add_lora(other, LoraConfig(rank=4, targets=("q", "v")))
    load_lora_state(other, state)
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(PicochatError, match="missing"):
        load_lora_state(other, missing)
    with pytest.raises(PicochatError, match="shape"):
        load_lora_state(other, {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state.items()})


@pytest.fixture(scope="module")
def tokenizer():
    from picochat.tokenizer import Tokenizer
    return Tokenizer.train(["the cat sees the garden. a dog likes the red ball. " * 20], VOCAB)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tokenizer):
    """A saved base checkpoint, and a trained adapter on it in a run dir (latest -> checkpoints/step_...)."""
    root = tmp_path_factory.mktemp("lora")
    config = llama_like(vocab_size=max(VOCAB, tokenizer.vocab_size))
    base = base_model(config)
    save_model(base, root / "base", tokenizer)
    model = copy.deepcopy(base)
    cfg = LoraConfig(rank=2, alpha=4, targets=("q", "v", "o", "lm_head"))
    add_lora(model, cfg)
    train_steps(model)
    run = root / "run"
    save_adapter(model, cfg, run / "checkpoints" / "step_0000004", base=str(root / "base"), tokenizer=tokenizer)
    (run / "latest").write_text("checkpoints/step_0000004\n")
    return root, run, model


def test_adapter_round_trip_is_small_and_loads_through_load_model(adapter_run):
    root, run, trained = adapter_run
    adir = run / "checkpoints" / "step_0000004"
    assert is_adapter(run) and is_adapter(adir) and not is_adapter(root / "base") and not is_adapter("smollm2")
    assert (adir / "adapter.json").is_file() and not (adir / "model.safetensors").exists()
    assert (adir / "adapter.safetensors").stat().st_size < 0.1 * (root / "base" / "model.safetensors").stat().st_size
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    want = logits(trained, idx)
    for path in (run, adir):
        model, tok, where = load_model(path)
        assert where == adir and tok is not None and not has_lora(model) and not model.training
        assert (logits(model, idx) - want).abs().max() <= 1e-5
    model, _, _ = load_adapter_model(run, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_adapter_on_a_different_base_is_refused(adapter_run, tmp_path, tokenizer):
    root, run, _ = adapter_run
    import json
    adir = run / "checkpoints" / "step_0000004"
    other = tmp_path / "other_base"
    save_model(base_model(llama_like(n_layer=3)), other, tokenizer)
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    for f in adir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / "adapter.json").read_text())
    meta["base"], meta["base_path"] = str(other), str(other)
    (bad / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(PicochatError, match="n_layer"):
        load_model(bad)
    meta["base"], meta["base_path"] = str(tmp_path / "gone"), None
    (bad / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(PicochatError, match="needs its base model"):
        load_model(bad)


def test_merge_lora_cli_writes_a_plain_checkpoint_once(adapter_run, tmp_path, capsys):
    root, run, trained = adapter_run
    out = tmp_path / "merged"
    assert main(["merge-lora", str(run), str(out)]) == 0
    assert (out / "config.json").is_file() and not is_adapter(out)
    model, tok, where = load_model(out)
    assert where == out and tok is not None and model.config.tie_embeddings is False
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    assert (logits(model, idx) - logits(trained, idx)).abs().max() <= 1e-5
    capsys.readouterr()
    assert main(["merge-lora", str(run), str(out)]) == 2  # OUT exists
    assert "--force" in capsys.readouterr().err
    assert main(["merge-lora", str(run), str(out), "--force"]) == 0
    assert main(["merge-lora", str(out), str(tmp_path / "twice")]) == 2  # a merged model: refused
    assert "already merged" in capsys.readouterr().err and not (tmp_path / "twice").exists()


def test_generate_accepts_an_adapter_run(adapter_run, capsys):
    _, run, _ = adapter_run
    assert main(["generate", str(run), "--prompt", "the cat", "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    # merged first, then quantized (the merge needs float weights)
    assert main(["generate", str(run), "--prompt", "the cat", "--max-tokens", "5", "--temperature", "0",
                 "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
