"""Encoder verbs: sentence embeddings and search (`picochat embed`), on the BERT encoder of model/bert.py."""
