"""What the conversation store accepts: field limits, valid text, and the turn order of a message tree.

Kept apart from the Store so that the HTTP layer can run the very same checks on a request before any
generation (a request refused after the work is done wastes it, and used to leave half a conversation).
"""
from __future__ import annotations

import json
from typing import Optional

from ..chat_template import turn_order_error
from .errors import ApiError

MAX_CONTENT_BYTES = 1_000_000   # one message (and the system prompt), as UTF-8
MAX_TITLE = 200
MAX_MODEL = 200
MAX_FINISH_REASON = 32
MAX_SETTINGS_BYTES = 64_000
MAX_INT = 2**63 - 1             # SQLite INTEGER; a bigger Python int makes sqlite3 raise OverflowError
ROLES = ("system", "user", "assistant")
SOURCES = ("web", "api")
MESSAGE_KEYS = frozenset({"role", "content", "model", "settings", "finish_reason", "prompt_tokens",
                          "completion_tokens", "images"})  # images: store_images.image_rows checks them


class StoreError(ApiError):
    """Base of the store's errors; an ApiError so the app answers with its status and OpenAI's shape."""


class NotFound(StoreError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(404, message, param, type="not_found_error", code="not_found")


class Invalid(StoreError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(400, message, param)


def check_text(value, name: str, limit_bytes: int = MAX_CONTENT_BYTES) -> str:
    """`value` if it is a str that can be stored: valid Unicode and at most `limit_bytes` of UTF-8.

    The limit is in bytes, not characters: 1,000,000 characters of "é" are 2 MB. A lone surrogate
    ("\\ud800" is legal JSON) has no UTF-8 form, so SQLite could not store it.
    """
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string, got {type(value).__name__}", name)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise Invalid(f"{name} is not valid Unicode (a lone surrogate {value[e.start]!r} at character {e.start}):"
                      " send UTF-8 text", name) from None
    if size > limit_bytes:
        raise Invalid(f"{name} is too long ({size} > {limit_bytes} bytes of UTF-8): shorten it", name)
    return value


def text(value, name: str, limit: int, *, optional: bool = True) -> Optional[str]:
    """A short field (title, model, finish_reason): at most `limit` characters, and valid Unicode."""
    if value is None and optional:
        return None
    check_text(value, name, limit_bytes=4 * limit)  # type and surrogates; 4 bytes per character at most
    if len(value) > limit:
        raise Invalid(f"{name} is too long ({len(value)} > {limit} characters)", name)
    return value


def settings_json(value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid("settings must be a JSON object", "settings")
    try:  # allow_nan=False: NaN is not JSON, and the response encoder would fail on it later
        dumped = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(dumped.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise Invalid(f"settings is not storable JSON: {e}", "settings") from None
    if size > MAX_SETTINGS_BYTES:
        raise Invalid(f"settings is too large ({size} > {MAX_SETTINGS_BYTES} bytes)", "settings")
    return dumped


def count(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise Invalid(f"{name} must be a non-negative integer", name)
    return value


def message_id(value, name: str = "message_id") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be an integer", name)
    if not 1 <= value <= MAX_INT:
        raise NotFound(f"no message with id {value}", name)
    return value


def message_row(m, name: str = "messages", role: Optional[str] = None) -> tuple:
    """(role, content, model, settings, finish_reason, prompt_tokens, completion_tokens) of one message
    dict (add_message's keyword arguments); `role` is the default and the only role allowed (answers)."""
    if not isinstance(m, dict) or set(m) - MESSAGE_KEYS:
        raise Invalid(f"a message takes only {sorted(MESSAGE_KEYS)}", name)
    r = m.get("role", role)
    if role is None and r not in ROLES:
        raise Invalid(f"role must be one of {ROLES}, got {str(r)[:40]!r}", "role")
    if role is not None and r != role:
        raise Invalid(f"{name} must be {role} messages, got role {str(r)[:40]!r}", "role")
    return (r, check_text(m.get("content"), "content"), text(m.get("model"), "model", MAX_MODEL),
            settings_json(m.get("settings")), text(m.get("finish_reason"), "finish_reason", MAX_FINISH_REASON),
            count(m.get("prompt_tokens"), "prompt_tokens"), count(m.get("completion_tokens"), "completion_tokens"))


def check_turn_order(path_roles: list[str], new_roles: list[str], answered: bool = False,
                     param: str = "parent_id") -> None:
    """Invalid unless the path from the root (`path_roles`, already stored) followed by `new_roles` is a
    conversation the chat template accepts; answered: assistant answers go under the last one."""
    roles = list(path_roles) + list(new_roles)
    why = turn_order_error(roles, answer=answered)
    if why is None:
        return
    hint = ("put a system message only at the root, or use the conversation's system_prompt" if "system" in why
            else "make each assistant message the child of the user message it answers (its id as parent_id)")
    raise Invalid(f"these messages break the conversation's turn order: {why} (message 0 is the root; the new "
                  f"ones start at message {len(path_roles)}). To fix: {hint}", param)
