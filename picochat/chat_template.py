"""Chat templates: a conversation becomes one token sequence in which special tokens mark who speaks.

    picochat: <|endoftext|><|system_start|>...<|system_end|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>
    ChatML (SmolLM2, Qwen, ...): <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...

`render_conversation` returns the ids and a loss mask (1 on the assistant's tokens, including the token
that ends its turn, so chat fine-tuning learns to answer and to stop, never to imitate the user).

A user message's content may also be a list of parts, {"type": "text", "text": ...} and {"type": "image"}
(OpenAI's and Hugging Face processors' shape; other keys of a part are the caller's). An image part becomes
`image_tokens` copies of <|image|>, never in the loss: a multimodal model puts the picture's N embeddings
at those positions (model/multimodal.py).
"""
from __future__ import annotations

from typing import Optional

from .errors import PicochatError

ROLES = ("system", "user", "assistant")

IMAGE_TOKEN = "<|image|>"

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def default_system_prompt(tokenizer, from_gguf: bool) -> Optional[str]:
    """The system prompt a model was tuned with, used when a conversation has none: SmolLM2's GGUF
    chat template inserts this one (our own models have no default)."""
    return SMOLLM2_SYSTEM if from_gguf and "<|im_start|>" in tokenizer.special_tokens else None


def pick_template(tokenizer) -> str:
    """ChatML when the vocabulary has <|im_start|>, else picochat's own when it has <|user_start|>."""
    specials = tokenizer.special_tokens
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        return "chatml"
    if "<|user_start|>" in specials and "<|assistant_start|>" in specials:
        return "picochat"
    raise PicochatError("this tokenizer has no chat special tokens (<|im_start|> or <|user_start|>): "
                        "the model was not trained for chat; use `picochat generate` instead")


def stop_token_ids(tokenizer, template: str) -> tuple[int, ...]:
    """Tokens that end an assistant turn: its end marker, the end of the text, and the start of any
    new turn (a model that opens a turn has finished its own, and must never write the user's)."""
    names = (["<|im_end|>", "<|endoftext|>", "<|im_start|>"] if template == "chatml" else
             ["<|assistant_end|>", "<|endoftext|>", "<|user_start|>", "<|system_start|>", "<|assistant_start|>"])
    return tuple(tokenizer.special_tokens[n] for n in names if n in tokenizer.special_tokens)


def turn_order_error(roles: list[str], answer: bool = False) -> Optional[str]:
    """Why this sequence of roles is not a conversation, or None. The one rule set that the template,
    the server and the conversation store share: a system message only comes first, and an assistant
    message answers a user message (so it comes right after one). answer=True: an assistant answer is
    about to be appended (a generation prompt), so the last message must be a user message."""
    for i, role in enumerate(roles):
        if role not in ROLES:
            return f"message {i}: role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}"
        if role == "system" and i != 0:
            return f"message {i}: a system message may only come first"
        if role == "assistant" and (i == 0 or roles[i - 1] != "user"):
            return f"message {i}: an assistant message must answer a user message (come right after one)"
    if answer and (not roles or roles[-1] != "user"):
        return "the last message must be a user message: the answer is generated for it"
    return None


def _is_part(p) -> bool:
    return isinstance(p, dict) and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))


def _check(messages: list[dict], answer: bool = False) -> None:
    if not isinstance(messages, list):
        raise PicochatError("messages must be a list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in ROLES or not (
                isinstance(content, str) or (isinstance(content, list) and all(map(_is_part, content)))):
            raise PicochatError(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': str or a list "
                                "of {'type': 'text', 'text': str} and {'type': 'image'} parts}")
        if isinstance(content, list) and m["role"] != "user" and any(p["type"] == "image" for p in content):
            raise PicochatError(f"message {i}: only a user message may hold an image")
    why = turn_order_error([m["role"] for m in messages], answer)
    if why:
        raise PicochatError(why)


def render_conversation(messages: list[dict], tokenizer, template: Optional[str] = None,
                        add_generation_prompt: bool = False,
                        default_system: Optional[str] = None,
                        image_tokens: Optional[int] = None) -> tuple[list[int], list[int]]:
    """-> (ids, loss_mask). Message text is encoded as plain text: a user typing "<|im_end|>" gets
    ordinary tokens, never the special one (no prompt injection through the template). An image part is
    image_tokens copies of <|image|>; a model without that token (or image_tokens) cannot take one."""
    _check(messages, answer=add_generation_prompt)
    template = template or pick_template(tokenizer)
    sp = tokenizer.special_tokens
    ids: list[int] = []
    mask: list[int] = []

    def encode(content) -> list[int]:
        if isinstance(content, str):
            return tokenizer.encode(content)
        out: list[int] = []
        for part in content:
            if part["type"] == "text":
                out += tokenizer.encode(part["text"])
            elif IMAGE_TOKEN not in sp or not image_tokens:
                raise PicochatError("this model cannot see images (it has no image encoder and no "
                                    f"{IMAGE_TOKEN} token); send text only, or use a model from `picochat vlm train`")
            else:
                out += [sp[IMAGE_TOKEN]] * image_tokens
        return out

    def add(tokens: list[int], learn: bool):
        ids.extend(tokens)
        mask.extend([int(learn)] * len(tokens))

    if default_system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}] + messages
    if template == "chatml":
        start, end, nl = sp["<|im_start|>"], sp["<|im_end|>"], tokenizer.encode("\n")
        for m in messages:
            learn = m["role"] == "assistant"
            add([start] + tokenizer.encode(m["role"] + "\n"), False)
            add(encode(m["content"]) + [end], learn)
            add(nl, False)
        if add_generation_prompt:
            add([start] + tokenizer.encode("assistant\n"), False)
    elif template == "picochat":
        add([tokenizer.eot_id], False)
        for m in messages:
            learn = m["role"] == "assistant"
            add([sp[f"<|{m['role']}_start|>"]], False)
            add(encode(m["content"]) + [sp[f"<|{m['role']}_end|>"]], learn)
        if add_generation_prompt:
            add([sp["<|assistant_start|>"]], False)
    else:
        raise PicochatError(f"unknown chat template {template!r}; use chatml or picochat")
    return ids, mask
