"""Attention over a picture: a chat model that sees (`picochat vlm train`) asked a question about an image.

    picochat attention runs/vlm "What colour is the circle?" --image scene.png

The question is rendered as the chat template renders a user message that holds the picture (its N
<|image|> markers, then the text); the model answers it greedily, as `picochat chat --image` does at
temperature 0; then the maps are taken over question and answer with the picture's N embeddings at its
markers, exactly as generation placed them. The view's `pictures` say where the picture's tokens sit and
carry a small PNG of it (a data: URL), so the HTML page and plot_image_attention can draw any token's
row over the picture.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

from ..errors import PicochatError
from .maps import MAX_TOKENS, AttentionView, gpt_maps, picture_runs

THUMB = 256  # the picture's side in the page and the PNG at most: enough to see it, small in the page


def as_the_model_sees(img, side: int = THUMB):
    """A Pillow image -> an RGB square the way data/scenes.image_to_input frames it for the model
    (orientation applied, transparency over white, padded with white to a centred square), at most
    `side` pixels: the model's sqrt(N) x sqrt(N) grid lies exactly over this square."""
    from PIL import Image

    from ..data.scenes import square_on_white
    square = square_on_white(img)
    if square.width > side:
        square = square.resize((side, side), Image.Resampling.BOX)
    return square.convert("RGB")


def png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def picture_pixels(src: str):
    """A picture's data: URL (a view's pictures[i]["src"]) -> (H, W, 3) floats in [0, 1], for matplotlib."""
    import numpy as np
    from PIL import Image
    data = base64.b64decode(src.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def vlm_maps_for(spec: str, question: str, image_path: str, title: str = "", answer_tokens: int = 24) -> AttentionView:
    """Load a chat model that sees, ask it `question` about the picture at image_path, and return the maps of
    question and answer (answer_tokens: the longest answer; 0 draws the question alone)."""
    from ..chat_template import pick_template, render_conversation, stop_token_ids
    from ..checkpoints.io import load_model
    from ..checkpoints.vlm import encode_pixels, image_token_id, load_image_encoder
    from ..data.scenes import image_to_input, open_image
    from ..engine.engine import Engine, PromptEmbeds, SamplingParams
    if answer_tokens < 0:
        raise PicochatError(f"--answer-tokens must be 0 or more, got {answer_tokens}")
    encoder = load_image_encoder(spec)
    if encoder is None:
        raise PicochatError(f"{spec} is a text-only model: it cannot see pictures, so --image has nothing to read "
                            "it; give a model trained with `picochat vlm train`, or leave out --image")
    img = open_image(image_path)  # refused (missing, not PNG/JPEG, too large, corrupt) before the model loads
    model, tok, _ = load_model(spec)
    marker = image_token_id(tok, encoder)
    pixels = image_to_input(img, encoder.config.vit_config().image_size)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt, _ = render_conversation(msgs, tok, add_generation_prompt=True, image_tokens=encoder.n_tokens)
    embeds = PromptEmbeds.at_markers(prompt, marker, encode_pixels(encoder, pixels[None]))
    room = min(answer_tokens, model.config.block_size - len(prompt), MAX_TOKENS - len(prompt))
    answer: list[int] = []
    if room > 0:
        params = SamplingParams(max_tokens=room, temperature=0, stop_token_ids=stop_token_ids(tok, pick_template(tok)))
        answer = Engine(model, tok).generate([prompt], params, embeds=[embeds])[0].token_ids
    pictures = picture_runs(prompt, marker, encoder.n_tokens)
    pictures[0].update(name=Path(image_path).name, width=img.width, height=img.height,
                       src=png_data_url(as_the_model_sees(img)))
    view = gpt_maps(model, tok, prompt + answer, f"{title or Path(spec).name}: {Path(image_path).name}",
                    embeds=embeds, pictures=pictures)
    view.answer_start = len(prompt)
    view.meta = {"question": question, "answer": tok.decode(answer)}
    return view
