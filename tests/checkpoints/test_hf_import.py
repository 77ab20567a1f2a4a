"""Hugging Face import/export: exact logit parity with transformers on tiny random GPT-2 and Llama models.

transformers is the oracle; the models are built from configs in code (no download) and every
parameter, norms and biases included, is randomised so a swapped or transposed tensor cannot hide.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from picochat.checkpoints.hf import config_from_hf, export_hf, load_hf, state_dict_from_hf  # noqa: E402
from picochat.errors import PicochatError  # noqa: E402
from picochat.model.config import ModelConfig  # noqa: E402
from picochat.model.gpt import GPT  # noqa: E402

VOCAB, CTX = 300, 64
TOL = 1e-5


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.08
            # norm gains around 1, everything else (matrices, biases) around 0
            p.copy_(1.0 + noise if ("ln" in name or "norm" in name) and name.endswith("weight") else noise)


def _tiny_gpt2(tie=True):
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=tie,
                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    m = GPT2LMHeadModel(cfg)
    _randomise(m)
    return m.eval()


def _tiny_llama(tie: bool, bias: bool = False):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
                      rope_parameters={"rope_type": "default", "rope_theta": 31250.0}, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, bos_token_id=None,
                      eos_token_id=None, attn_implementation="eager")
    m = LlamaForCausalLM(cfg)
    _randomise(m, seed=1)
    return m.eval()


def _batch(seed=0, B=3, T=CTX):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _compare(hf_model, pico: GPT):
    """Max |logit diff| and |loss diff| on a random batch; loss uses HF labels vs picochat's shifted targets."""
    idx = _batch()
    with torch.no_grad():
        ref = hf_model(input_ids=idx, labels=idx)
        targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)
        logits, loss = pico(idx, targets)
    return (logits - ref.logits).abs().max().item(), (loss - ref.loss).abs().item()


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_import_matches_transformers(tmp_path, tie):
    hf = _tiny_gpt2(tie)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert not model.training
    assert model.config.pos == "learned" and model.config.norm == "layernorm" and model.config.bias
    assert model.config.activation == "gelu_tanh" and model.config.tie_embeddings == tie
    dl, dloss = _compare(hf, model)
    assert dl < TOL and dloss < TOL, (dl, dloss)


@pytest.mark.parametrize("tie,bias", [(True, False), (False, False), (False, True)])
def test_llama_import_matches_transformers(tmp_path, tie, bias):
    hf = _tiny_llama(tie, bias)
    hf.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not tie)
    model = load_hf(tmp_path)
    c = model.config
    assert (c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden) == (4, 2, 16, 96)
    assert c.rope_base == 31250.0 and c.norm == "rmsnorm" and c.activation == "swiglu" and c.bias == bias
    assert c.tie_embeddings == tie
    dl, dloss = _compare(hf, model)
    assert dl < TOL and dloss < TOL, (dl, dloss)


def test_llama_sharded_and_unprefixed_names(tmp_path):
    """A sharded folder (index.json) and a file whose names lack the 'model.' prefix load the same."""
    hf = _tiny_llama(tie=True)
    hf.save_pretrained(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        # the second shard drops the prefix, as a bare LlamaModel would save it
        save_file({(k.removeprefix("model.") if "00002" in fname else k): state[k] for k in keys}, str(out / fname))
        weight_map.update({(k.removeprefix("model.") if "00002" in fname else k): fname for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dl, _ = _compare(hf, load_hf(out))
    assert dl < TOL


def _roundtrip(tmp_path, config: ModelConfig):
    torch.manual_seed(0)
    pico = GPT(config)
    _randomise(pico, seed=2)
    pico.eval()
    export_hf(pico, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager",
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    dl, dloss = _compare(hf.eval(), pico)
    assert dl < TOL and dloss < TOL, (dl, dloss)
    # and back again through our own importer
    again = load_hf(tmp_path / "export")
    assert again.config == pico.config
    with torch.no_grad():
        assert torch.equal(again(_batch())[0], pico(_batch())[0])


@pytest.mark.parametrize("config", [
    ModelConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_embd=64, pos="learned", norm="layernorm",
                activation="gelu_tanh", bias=True, tie_embeddings=True),
    ModelConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_embd=64, pos="learned", norm="layernorm",
                activation="gelu", bias=True, tie_embeddings=False, ffn_hidden=96),
    ModelConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=96,
                rope_base=5000.0, tie_embeddings=False),
    ModelConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_kv_head=1, n_embd=64, head_dim=8,
                bias=True, tie_embeddings=True),
], ids=["gpt2-tied", "gpt2-gelu-untied", "llama-gqa-untied", "llama-mqa-bias-headdim"])
def test_export_roundtrip_through_transformers(tmp_path, config):
    _roundtrip(tmp_path, config)


# ------------------------------------------------------------------------------------------ bad input

def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(PicochatError, match=r"'bert'.*gpt2, llama"):
        load_hf(tmp_path)


def test_missing_tensor(tmp_path):
    _tiny_llama(tie=False).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.gate_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PicochatError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight.*missing.*\[96, 64\]"):
        load_hf(tmp_path)


def test_untied_without_lm_head_is_missing(tmp_path):
    _tiny_gpt2(tie=False).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PicochatError, match=r"'lm_head\.weight' is missing"):
        load_hf(tmp_path)


def test_wrong_shape(tmp_path):
    _tiny_gpt2().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 190)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PicochatError, match=r"transformer\.h\.0\.attn\.c_attn\.weight.*\[64, 190\].*\[64, 192\]"):
        load_hf(tmp_path)


def test_unexpected_tensor():
    cfg = config_from_hf(_tiny_gpt2().config.to_dict())
    state = dict(_tiny_gpt2().state_dict())
    state["transformer.h.2.ln_1.weight"] = torch.ones(64)
    with pytest.raises(PicochatError, match=r"unexpected tensors.*transformer\.h\.2\.ln_1\.weight"):
        state_dict_from_hf(state, cfg, "gpt2")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_gpt2().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(PicochatError, match="pickle"):
        load_hf(tmp_path)


def test_config_variants():
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": CTX}
    # transformers 4 layout: rope_theta at the top, rope_scaling null
    assert config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": None}).rope_base == 500000.0
    assert config_from_hf(base).rope_base == 10000.0 and config_from_hf(base).n_kv_head == 4
    for scaling in ({"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}, {"type": "linear", "factor": 2.0}):
        with pytest.raises(PicochatError, match="RoPE scaling"):
            config_from_hf({**base, "rope_parameters": scaling})
    with pytest.raises(PicochatError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(PicochatError, match="hidden_act"):
        config_from_hf({**base, "hidden_act": "gelu"})


@pytest.mark.parametrize("overrides,field", [
    (dict(pos="alibi"), "pos"),
    (dict(pos="learned", norm="layernorm", activation="swiglu", bias=True), "activation"),
    (dict(pos="learned", norm="layernorm", activation="gelu_tanh", bias=False), "bias"),
    (dict(pos="rope", norm="layernorm"), "norm"),
    (dict(pos="rope", norm_position="post"), "norm_position"),
])
def test_export_refuses_inexpressible_configs(tmp_path, overrides, field):
    model = GPT(ModelConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=4, n_embd=64, **overrides))
    with pytest.raises(PicochatError, match=rf"\b{field}="):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
