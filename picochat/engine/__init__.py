"""Inference: sampling now; the KV-cache engine and the scheduler arrive with the serving work."""
