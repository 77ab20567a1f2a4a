"""`picochat embed`: vectors, the similarity matrix and search by meaning, through the CLI's function."""
import pytest

from picochat.encoder.cli import EmbedConfig, embed
from picochat.errors import PicochatError


def test_similarity_matrix_vector_and_search(tmp_path, capsys):
    out = embed(EmbedConfig(texts=["A man is eating food.", "A man is eating a piece of bread.",
                                   "A monkey is playing drums."]))
    sim = out["similarity"]
    assert sim[0][1] == pytest.approx(0.755, abs=0.01) and sim[0][2] < 0.25 and sim[1][1] == pytest.approx(1, abs=1e-3)
    assert len(embed(EmbedConfig(texts=["hello"]))["vectors"][0]) == 384
    notes = tmp_path / "notes.txt"
    notes.write_text("I had pasta for dinner.\n\nThe invoice is in the blue folder.\nThe cat sleeps on the sofa.\n")
    ranked = embed(EmbedConfig(texts=["where did I put the bill?"], search=str(notes), top=2))["ranked"]
    assert ranked[0]["line"] == "The invoice is in the blue folder." and len(ranked) == 2  # no shared word
    capsys.readouterr()


@pytest.mark.parametrize("kw,msg", [({"texts": []}, "at least one text"), ({"model": "nowhere", "texts": ["x"]},
                                    "not an encoder"), ({"texts": ["a", "b"], "search": "f"}, "one query"),
                                   ({"texts": ["a"], "top": 0}, "--top"), ({"texts": ["a"], "top": 3}, "--search")])
def test_bad_input_is_refused_by_name(kw, msg):
    with pytest.raises(PicochatError, match=msg):
        embed(EmbedConfig(**kw))


def test_non_encoder_checkpoint_and_overlong_text_are_one_line_errors(tmp_path, capsys):
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(PicochatError, match="not an encoder") as e:
        embed(EmbedConfig(model=str(gpt), texts=["x"]))
    assert "\n" not in str(e.value)
    long_text = "word " * 300  # 300 WordPiece tokens + [CLS] [SEP] > MiniLM's 256
    with pytest.raises(PicochatError, match=r"text 1 is 302 tokens.*at most 256"):
        embed(EmbedConfig(texts=["short", long_text]))
    notes = tmp_path / "notes.txt"
    notes.write_text("fine\n\n" + long_text + "\n")
    with pytest.raises(PicochatError, match=r"notes.txt:3 is 302 tokens"):
        embed(EmbedConfig(texts=["q"], search=str(notes)))
    capsys.readouterr()


def test_a_sentence_transformers_folder_keeps_its_own_pooling_and_length(tmp_path):
    """A folder's 1_Pooling/config.json and sentence_bert_config.json are honoured: CLS pooling is refused by
    name (mean pooling would give other vectors), max_seq_length becomes the limit."""
    import json
    from picochat.encoder.embeddings import load_encoder
    from picochat.model.bert import minilm_dir
    folder = tmp_path / "st"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / f).symlink_to(minilm_dir() / f)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert load_encoder(str(folder)).max_tokens == 128
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                  "pooling_mode_mean_tokens": False}))
    with pytest.raises(PicochatError, match="other than by the mean"):
        load_encoder(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(PicochatError, match="lacks model.safetensors"):
        load_encoder(str(folder))
