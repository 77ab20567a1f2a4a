"""The conversation store's HTTP routes (`/api/...`, docs/api.md), minus `GET /api/config` (the app's).

Handlers are plain `def`s: FastAPI runs them in its thread pool, so a slow SQLite write never blocks
the event loop that streams tokens. The Store raises ApiErrors (404/400); the app's exception handler
turns them into OpenAI-shaped JSON. Request models ignore unknown fields, so the page and the API can
grow a field without breaking each other; every field has a type and a size limit.

Ids in paths are taken as strings and checked by the store, so a malformed id is a 404, never a 422
or a 500 (an integer wider than SQLite's 64 bits would otherwise crash the driver). Text fields are
checked with the store's own rules (store_rules.check_text: valid Unicode, a limit in UTF-8 bytes), so a
body is refused before any work, with the same message the store would give.

A user message may carry pictures: POST .../messages takes OpenAI's content parts (text and `image_url`
with a data: URL, checked as /v1/chat/completions checks them: images.py), every message comes back with
its "images" (where each sits in the text, and a `url`), and GET /api/images/{id} serves the bytes.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field, model_validator

from .protocol import Part
from .store import MAX_CONTENT_BYTES, MAX_INT, MAX_MODEL, MAX_TITLE, NotFound, Store
from . import store_transfer
from .store_rules import Invalid, check_text

Id = Field(None, ge=1, le=MAX_INT)


def _stored_as(name: str, limit_bytes: int):
    """The store's text rule as a pydantic validator (a ValueError becomes the app's 400)."""
    def check(value):
        try:
            return value if value is None else check_text(value, name, limit_bytes)
        except Invalid as e:
            raise ValueError(e.message) from None
    return AfterValidator(check)


# max_length (characters) is a cheap first cut, and documents the field in the OpenAPI schema; the
# validator is the real rule: 1,000,000 characters of "é" are 2,000,000 bytes
Content = Annotated[str, Field(max_length=MAX_CONTENT_BYTES), _stored_as("content", MAX_CONTENT_BYTES)]
SystemPrompt = Annotated[Optional[str], Field(max_length=MAX_CONTENT_BYTES),
                         _stored_as("system_prompt", MAX_CONTENT_BYTES)]
Title = Annotated[Optional[str], Field(max_length=MAX_TITLE), _stored_as("title", 4 * MAX_TITLE)]
Model = Annotated[Optional[str], Field(max_length=MAX_MODEL), _stored_as("model", 4 * MAX_MODEL)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class NewConversation(_Body):
    model: Model = None
    title: Title = None
    system_prompt: SystemPrompt = None
    settings: Optional[dict[str, Any]] = None


class ConversationPatch(NewConversation):
    """Fields left out (or null) stay as they are."""


class NewMessage(_Body):
    role: Literal["user", "assistant", "system"] = "user"
    content: Union[Content, list[Part]] = Field(description="text, or a user message's parts: text and image_url "
                                                            "(a data: URL of a PNG or JPEG)")
    parent_id: Optional[int] = Id

    @model_validator(mode="after")
    def _parts(self):
        if isinstance(self.content, list):
            check = _stored_as("content", MAX_CONTENT_BYTES).func
            check("".join(p.text for p in self.content if p.type == "text"))
            if self.role != "user" and any(p.type == "image_url" for p in self.content):
                raise ValueError(f"only user messages may hold pictures; this one is a {self.role} message")
        return self


class Rating(_Body):
    rating: Literal[1, -1, 0] = Field(description="1 thumbs up, -1 thumbs down, 0 cleared")


class Ranking(_Body):
    chosen_id: int = Field(ge=1, le=MAX_INT)
    rejected_id: int = Field(ge=1, le=MAX_INT)


class ConversationSummary(BaseModel):
    id: str
    title: str
    model: Optional[str]
    source: str
    created_at: float
    updated_at: float
    message_count: int


class Conversation(BaseModel):
    id: str
    title: str
    model: Optional[str]
    system_prompt: Optional[str]
    settings: Optional[dict[str, Any]]
    source: str
    created_at: float
    updated_at: float


class Image(BaseModel):
    id: int
    offset: int = Field(description="where the picture sits in the message's content, in characters (code points)")
    media_type: str
    width: int
    height: int
    bytes: int

    @computed_field
    @property
    def url(self) -> str:
        return f"/api/images/{self.id}"


class Message(BaseModel):
    id: int
    parent_id: Optional[int]
    role: str
    content: str
    model: Optional[str]
    settings: Optional[dict[str, Any]]
    finish_reason: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    created_at: float
    rating: Optional[int]
    images: list[Image] = []


class ConversationWithMessages(Conversation):
    messages: list[Message]
    rankings: list["RankingOut"] = []


class RatingOut(BaseModel):
    message_id: int
    rating: Optional[int]


class RankingOut(Ranking):
    id: int
    created_at: float


ConversationWithMessages.model_rebuild()


class Deleted(BaseModel):
    deleted: bool


def _id(text: str, param: str = "message_id", what: str = "message") -> int:
    """An id from a path: digits only (no sign, no spaces), else 404 like an unknown id."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise NotFound(f"no {what} with id {text[:40]!r}", param)
    return int(text)


def _mid(text: str) -> int:
    return _id(text)


def _download(doc: dict, name: str) -> Response:
    return Response(json.dumps(doc, ensure_ascii=False), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{name}.json"'})


def store_router(store: Store) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["conversations"])

    @r.get("/conversations", response_model=list[ConversationSummary])
    def list_conversations(limit: int = Query(200, ge=1, le=10_000),
                           q: Optional[str] = Query(None, max_length=200, description="title or content holds this")):
        return store.list_conversations(limit, q)

    @r.post("/conversations", response_model=Conversation)
    def create_conversation(body: Optional[NewConversation] = None):
        body = body or NewConversation()
        return store.create_conversation(**body.model_dump(), source="web")

    @r.get("/conversations/{conversation_id}", response_model=ConversationWithMessages)
    def get_conversation(conversation_id: str):
        return store.get_conversation(conversation_id)

    @r.patch("/conversations/{conversation_id}", response_model=Conversation)
    def update_conversation(conversation_id: str, body: ConversationPatch):
        return store.update_conversation(conversation_id, **body.model_dump())

    @r.get("/conversations/{conversation_id}/export")
    def export_conversation(conversation_id: str):
        """The whole conversation as one JSON document (store_transfer.py): every branch, ratings, rankings,
        pictures; POST /api/import takes it back."""
        return _download(store_transfer.export_conversation(store, conversation_id), f"conversation-{conversation_id}")

    @r.get("/export")
    def export_all():
        return _download(store_transfer.export_all(store), "picochat-conversations")

    @r.post("/import")
    def import_conversations(body: dict[str, Any]):
        """One exported conversation, or an export of all: imported under new ids in one transaction."""
        return {"imported": store_transfer.import_conversations(store, body)}

    @r.delete("/conversations/{conversation_id}", response_model=Deleted)
    def delete_conversation(conversation_id: str):
        store.delete_conversation(conversation_id)
        return {"deleted": True}

    @r.post("/conversations/{conversation_id}/messages", response_model=Message)
    def add_message(conversation_id: str, body: NewMessage):
        from .images import content_with_pictures, for_store
        content = body.content
        if isinstance(content, list):  # pictures checked (and decoded) here, before anything is stored
            content = content_with_pictures(content, "content")
        m = for_store({"role": body.role, "content": content})
        return store.add_message(conversation_id, role=body.role, content=m["content"], parent_id=body.parent_id,
                                 images=m.get("images"))

    @r.get("/images/{image_id}", response_class=Response,
           responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    def get_image(image_id: str):
        """A stored picture's bytes, as they were sent (PNG or JPEG)."""
        im = store.image(_id(image_id, "image_id", "picture"))
        # an id always names the same bytes: the browser may keep them
        return Response(im["data"], media_type=im["media_type"],
                        headers={"Cache-Control": "private, max-age=31536000, immutable",
                                 "Content-Disposition": f'inline; filename="picture-{im["id"]}.'
                                                        f'{"png" if im["media_type"] == "image/png" else "jpg"}"'})

    @r.post("/messages/{message_id}/rating", response_model=RatingOut)
    def set_rating(message_id: str, body: Rating):
        return store.set_rating(_mid(message_id), body.rating)

    @r.post("/rankings", response_model=RankingOut)
    def add_ranking(body: Ranking):
        return store.add_ranking(body.chosen_id, body.rejected_id)

    return r
