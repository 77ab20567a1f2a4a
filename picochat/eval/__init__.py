"""Evaluation: exact-match accuracy on the held-out chat tasks and bits per byte on held-out chat text."""
from .chat_eval import chat_bpb, eval_tasks, evaluate

__all__ = ["chat_bpb", "eval_tasks", "evaluate"]
