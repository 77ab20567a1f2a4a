"""Text in, token shards out: corpora (corpus.py) and tokenized train/val datasets (prepare.py)."""
