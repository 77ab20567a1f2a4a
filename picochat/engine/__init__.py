"""Inference: KV cache (kv_cache.py), batched streaming generation (engine.py), sampling (sampling.py)."""
