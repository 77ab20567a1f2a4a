"""The BERT encoder: picochat's blocks with bidirectional attention, checked against Hugging Face's BertModel
on random tiny weights (exact name mapping) and on the real all-MiniLM-L6-v2 (hidden states and the
sentence similarities the model is known for)."""
import pytest
import torch

from picochat.model.bert import BertEncoder, config_from_bert, embed_texts, load_bert, minilm_dir, state_from_bert


@pytest.fixture(scope="module")
def minilm():
    return load_bert()


def test_random_tiny_bert_equals_transformers():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    hf_cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, layer_norm_eps=1e-12)
    hf = BertModel(hf_cfg, add_pooling_layer=False).eval()
    ours = BertEncoder(config_from_bert(hf_cfg.to_dict() | {"model_type": "bert"})).eval()
    ours.load_state_dict(state_from_bert(hf.state_dict(), 2))
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = torch.randint(0, 2, (3, 11))
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = ours(ids, mask, types)
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_minilm_matches_transformers_and_knows_what_sentences_mean(minilm):
    from transformers import BertModel
    model, tok = minilm
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "A monkey is playing drums."]
    enc = tok.encode_batch(texts)
    ids, mask = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
    hf = BertModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=mask).last_hidden_state, model(ids, mask)
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-4)
    e = embed_texts(model, tok, texts)
    sim = e @ e.T
    assert sim[0, 1] == pytest.approx(0.755, abs=0.01)  # sentence-transformers' published example
    assert sim[0, 2:].max() < 0.25 and torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_padding_changes_nothing_and_attention_looks_both_ways(minilm):
    model, tok = minilm
    short, long = "Paris is in France.", "The quick brown fox jumps over the lazy dog near the river bank."
    alone = embed_texts(model, tok, [short])
    batched = embed_texts(model, tok, [short, long])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)  # padding keys are masked out
    a, b = tok.encode("the cat sat on the mat"), tok.encode("the cat sat on the rug")
    with torch.no_grad():
        ha = model(torch.tensor([a.ids]), torch.tensor([a.attention_mask]))
        hb = model(torch.tensor([b.ids]), torch.tensor([b.attention_mask]))
    assert (ha[0, 1] - hb[0, 1]).abs().max() > 1e-3  # "cat" sees the last word: bidirectional, not causal


DOZEN = ["A man is eating food.", "The stock market fell 3.2% on Tuesday, its worst day since 2008.",
         "Où est la bibliothèque ?", "def f(x): return x ** 2  # squares", "I ❤️ New York!!!",
         "Photosynthesis converts light energy into chemical energy in chloroplasts.",
         "   leading and trailing spaces   ", "UPPER CASE AND lower case", "naïve café résumé coöperate",
         "Mr. O'Neil's dog-sled team won the 1,049-mile Iditarod.", "日本語のテキストも読めます。",
         "The quick brown fox jumps over the lazy dog " * 5]


def test_minilm_sentence_embeddings_and_token_ids_on_a_dozen_varied_sentences():
    """picochat's Encoder (our blocks, our padding, our pooling) against transformers' BertModel + mean
    pooling one sentence at a time; ids against the model's own tokenizer.json and against transformers'
    pure-Python BertTokenizer read from vocab.txt (a second, independent WordPiece implementation)."""
    from tokenizers import Tokenizer
    from transformers import BertModel, BertTokenizer
    from picochat.encoder.embeddings import load_encoder
    enc = load_encoder("minilm")
    ids = enc.encode(DOZEN)
    own = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    own.no_padding()  # the file pads to 128
    slow = BertTokenizer(str(minilm_dir() / "vocab.txt"), do_lower_case=True)
    for text, ours in zip(DOZEN, ids):
        assert ours == own.encode(text).ids == slow(text)["input_ids"], text
    hf = BertModel.from_pretrained(str(minilm_dir())).eval()
    want = []
    with torch.no_grad():
        for seq in ids:
            h = hf(input_ids=torch.tensor([seq])).last_hidden_state[0]
            want.append(torch.nn.functional.normalize(h.mean(0), dim=-1))
    got = enc.embed_ids(ids)  # batched, padded, in length order
    assert (got - torch.stack(want)).abs().max() < 1e-5


@pytest.mark.parametrize("task,labels", [("mlm", ()), ("sequence", ("press", "fiction", "learned")),
                                         ("token", ("NOUN", "VERB", "DET", "ADP", "."))])
def test_heads_equal_transformers_after_export_and_come_back(task, labels, tmp_path):
    """Each head written in transformers' format loads into BertForMaskedLM / ...SequenceClassification /
    ...TokenClassification and gives our logits; and it reads back into picochat unchanged."""
    import json
    import transformers
    from safetensors.torch import load_file, save_file
    from picochat.model.bert import ARCHITECTURES, BertForTask, bert_task_from_state, config_to_bert, state_to_bert
    from picochat.model.config import ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32, ffn_hidden=64, pos="learned",
                      norm="layernorm", norm_eps=1e-12, norm_position="post", activation="gelu", bias=True,
                      tie_embeddings=False)
    ours = BertForTask(cfg, task, labels).eval()
    for p in ours.parameters():  # nothing left at its zero/one init: every name must really map
        torch.nn.init.normal_(p, std=0.2)
    save_file(state_to_bert(ours), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_bert(cfg, task, labels)))
    hf = getattr(transformers, ARCHITECTURES[task]).from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).logits
        b = ours(ids, mask)
    rows = mask.bool() if task != "sequence" else torch.ones(2, dtype=torch.bool)
    assert a.shape == b.shape and torch.allclose(a[rows], b[rows], atol=1e-5)
    back = bert_task_from_state(json.loads((tmp_path / "config.json").read_text()),
                                load_file(str(tmp_path / "model.safetensors"))).eval()
    assert back.labels == labels and torch.equal(back(ids, mask), b)


def test_a_rope_encoder_round_trips_and_transformers_refuses_it(tmp_path):
    """RoPE positions (picochat bert's default) are not BERT's: saved under model_type picochat_bert, which
    picochat reads back exactly and transformers' Auto classes refuse rather than fill with random positions."""
    import json
    import transformers
    from safetensors.torch import load_file, save_file
    from picochat.model.bert import BertForTask, bert_task_from_state, config_to_bert, state_to_bert
    from picochat.model.config import ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32, ffn_hidden=64, pos="rope",
                      norm="layernorm", norm_eps=1e-12, norm_position="post", activation="gelu", bias=True,
                      tie_embeddings=False)
    ours = BertForTask(cfg, "token", ("A", "B")).eval()
    for p in ours.parameters():  # past the near-uniform attention of the 0.02 init
        torch.nn.init.normal_(p, std=0.3)
    save_file(state_to_bert(ours), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_bert(cfg, "token", ("A", "B"))))
    back = bert_task_from_state(json.loads((tmp_path / "config.json").read_text()),
                                load_file(str(tmp_path / "model.safetensors"))).eval()
    ids = torch.randint(1, 50, (2, 9))
    assert back.config.pos == "rope" and torch.equal(back(ids), ours(ids))
    with torch.no_grad():  # positions matter: the same tokens in another order give other states
        assert not torch.allclose(ours.encoder(ids)[:, 0], ours.encoder(ids.flip(1))[:, -1], atol=1e-2)
    with pytest.raises(ValueError):
        transformers.AutoModelForTokenClassification.from_pretrained(str(tmp_path))
