"""Pictures in requests: OpenAI's `image_url` content parts, read from data: URLs only.

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0...", "detail": "auto"}}

The server fetches nothing: reading an http(s) URL would make it a proxy into whatever network it sits
in, and leave requests waiting on someone else's host. Any URL but a data: URL is a 400 that says to send
the bytes instead. A data: URL must be base64 PNG or JPEG (image/png, image/jpeg or image/jpg). The bytes
are checked by the reader `picochat chat --image` uses (data/scenes.open_image: at most 20 MB and 4096 x
4096 pixels, neither corrupt nor truncated) and shrunk to the model's size the same way (image_to_input), so
the server and the terminal chat show a model the same pixels. What the bytes really are wins over what
the URL says: a PNG sent as image/jpeg is read, and stored, as the PNG it is.

`detail` ("auto", "low" or "high") is accepted and changes nothing: a picochat model reads every picture at
its one fixed size (24 x 24 pixels, N image tokens).

Decoding costs CPU in proportion to the picture, so callers run `read_picture` in a worker thread. The
page and API clients send a conversation's pictures again with every turn: a picture seen before is
known by its SHA-256, and its pixels come from a small cache instead of a second decode.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import PicochatError
from .errors import bad_request

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
FORMAT_MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg"}
EXAMPLE = "data:image/png;base64,iVBORw0KGgo..."
_CACHE_SIZE = 512
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()   # (sha256, size) -> (media_type, width, height, pixels)
_lock = threading.Lock()


@dataclass(frozen=True, eq=False)
class Picture:
    """A checked picture: its bytes as sent, what they are, and (when a model will read it) its pixels."""
    data: bytes
    media_type: str                 # of the bytes (image/png or image/jpeg), whatever the URL said
    width: int
    height: int
    sha256: str
    pixels: Optional[object] = None  # (3, size, size) uint8 torch tensor: the model's input

    def stored(self, offset: int) -> dict:
        """The picture as the store takes it (store_images.image_rows), at `offset` in its message's text."""
        return {"offset": offset, "media_type": self.media_type, "data": self.data, "width": self.width,
                "height": self.height}


def _max_bytes() -> int:
    from ..data.scenes import MAX_FILE_BYTES
    return MAX_FILE_BYTES


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 PNG/JPEG data: URL, or a 400 naming what is wrong with it."""
    if not url[:5].lower() == "data:":
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        what = f"an {scheme} URL" if scheme in ("http", "https") else f"the URL {url[:48]!r}"
        raise bad_request(f"{param}: this server fetches nothing, so it does not read {what}; send the picture "
                          f"itself as a data: URL with base64 PNG or JPEG ({EXAMPLE})", param)
    comma = url.find(",", 0, 256)
    if comma < 0:
        raise bad_request(f"{param}: a data: URL is a header and the data, separated by a comma ({EXAMPLE})", param)
    header = [p.strip() for p in url[5:comma].lower().split(";")]
    media = header[0]
    if media not in MEDIA_TYPES:
        raise bad_request(f"{param}: the data: URL holds {media or 'data of no media type'}; send a PNG or JPEG "
                          "picture (image/png or image/jpeg)", param)
    if "base64" not in header[1:]:
        raise bad_request(f"{param}: the data: URL must be base64-encoded (data:{media};base64,...)", param)
    b64 = url[comma + 1:]
    limit = _max_bytes()
    if len(b64) // 4 * 3 > limit + 3:  # checked before decoding: 4 characters per 3 bytes
        raise bad_request(f"{param}: the picture is about {len(b64) * 3 / 4 / 2**20:.1f} MB; pictures up to "
                          f"{limit // 2**20} MB are read: shrink it", param)
    try:
        data = base64.b64decode("".join(b64.split()), validate=True)  # (line breaks some encoders add: ignored)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URL's data is not valid base64 (A-Z a-z 0-9 + / and = padding); "
                          "encode the file's bytes with standard base64", param) from None
    if not data:
        raise bad_request(f"{param}: the data: URL holds no data; send the picture's bytes", param)
    return data


def check_picture(data: bytes, param: str, size: Optional[int] = None) -> Picture:
    """Bytes -> a checked Picture (with (3, size, size) pixels when size is given), or a 400 naming the problem."""
    sha = hashlib.sha256(data).hexdigest()
    with _lock:
        hit = _cache.get((sha, size))
        if hit is not None:
            _cache.move_to_end((sha, size))
    if hit is None:
        from ..data.scenes import image_to_input, open_image
        try:
            img = open_image(data, name=f"the picture in {param}")
        except PicochatError as e:
            raise bad_request(str(e), param) from None
        try:
            pixels = image_to_input(img, size) if size else None
        except (OSError, ValueError) as e:
            raise bad_request(f"the picture in {param} cannot be converted to RGB ({e}); save it as an ordinary "
                              "PNG or JPEG", param) from None
        hit = (FORMAT_MEDIA[img.format], img.width, img.height, pixels)
        with _lock:
            _cache[(sha, size)] = hit
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    media, w, h, pixels = hit
    return Picture(data, media, w, h, sha, pixels)


def read_picture(url: str, param: str, size: Optional[int] = None) -> Picture:
    """A data: URL -> a checked Picture (pixels at size x size when given), or a 400 naming the problem."""
    return check_picture(data_url_bytes(url, param), param, size)


def content_with_pictures(parts: list, param: str, size: Optional[int] = None) -> Union[str, list[dict]]:
    """A message's protocol parts -> its content for the chat template: the joined text when it holds no
    picture, else parts in order, adjacent texts joined (as Message.text() joins them) and empty ones
    dropped, each picture {"type": "image", "picture": Picture}."""
    out: list[dict] = []
    for j, p in enumerate(parts):
        if p.type == "text":
            if out and out[-1]["type"] == "text":
                out[-1] = {"type": "text", "text": out[-1]["text"] + p.text}
            elif p.text:
                out.append({"type": "text", "text": p.text})
        else:
            out.append({"type": "image", "picture": read_picture(p.image_url.url, f"{param}.{j}.image_url.url", size)})
    if not any(p["type"] == "image" for p in out):
        return "".join(p["text"] for p in out)
    return out


def split_content(content: Union[str, list[dict]]) -> tuple[str, list[tuple[int, Picture]]]:
    """Content -> (its text, [(offset in that text in characters, picture)]): how the store keeps it."""
    if isinstance(content, str):
        return content, []
    text, pictures = "", []
    for p in content:
        if p["type"] == "text":
            text += p["text"]
        else:
            pictures.append((len(text), p["picture"]))
    return text, pictures


def signature(content: Union[str, list[dict]]) -> tuple:
    """What identifies a message's content: its text and where which picture sits (by SHA-256)."""
    text, pictures = split_content(content)
    return text, tuple((offset, pic.sha256) for offset, pic in pictures)


def stored_signature(message: dict) -> tuple:
    """signature() of a stored message (Store.path_to's dicts)."""
    return message["content"], tuple((im["offset"], im["sha256"]) for im in message.get("images") or [])


def pictures_in(messages: list[dict]) -> list[Picture]:
    """Every picture of the conversation, in order (the order of its <|image|> runs)."""
    return [p["picture"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image"]


# ---- a chat request's pictures ----------------------------------------------------------------------------
MAX_PICTURES = 32   # per request (and per stored message): each is decoded, however small its data: URL


def cannot_see(host, hosts) -> str:
    """Why a text-only model refuses a picture, naming the served models that can see."""
    seeing = [h.id for h in hosts if h.vision is not None]
    can = (f"send it to a model that sees ({', '.join(seeing)})" if seeing else
           "no model served here can see (serve one from `picochat vlm train`)")
    return (f"model {host.id!r} is a text-only model: it cannot see pictures (image_url parts); {can}, or send "
            "text only")


def request_messages(body, host) -> list[dict]:
    """The request's messages for the chat template (roles mapped, pictures read and checked, at the model's
    size), or a 400 naming the part at fault. Run in a worker thread when it holds pictures."""
    count = sum(sum(p.type == "image_url" for p in m.content) for m in body.messages if m.has_images())
    if count > MAX_PICTURES:
        raise bad_request(f"the messages hold {count} pictures; one request may hold at most {MAX_PICTURES}",
                          "messages")
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": content_with_pictures(m.content, f"messages.{i}.content", host.image_size)
             if m.has_images() else m.text()} for i, m in enumerate(body.messages)]


async def prompt_embeds(host, ids: list[int], kept: list[dict]):
    """engine.PromptEmbeds for the pictures of the messages the model reads (None without any): encoded on
    the model's own thread (torch work anywhere else would fight its OpenMP pool for the cores)."""
    import asyncio

    import torch

    from ..checkpoints.vlm import encode_pixels
    from ..engine.engine import PromptEmbeds
    pictures = pictures_in(kept)
    if not pictures:
        return None
    pixels = torch.stack([p.pixels for p in pictures])
    z = await asyncio.wrap_future(host.scheduler.run_on_model(lambda: encode_pixels(host.vision, pixels)))
    return PromptEmbeds.at_markers(ids, host.image_id, z)


def for_store(message: dict) -> dict:
    """A chat template message -> the store's message dict (text in content, pictures in images)."""
    text, pictures = split_content(message["content"])
    return {"role": message["role"], "content": text} | (
        {"images": [p.stored(offset) for offset, p in pictures]} if pictures else {})
