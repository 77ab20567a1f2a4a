"""Attention over a picture in a real browser: the web page's Attention dialog on an answer about a picture
(the picture fetched with the page's own requests, the heat of its image tokens drawn over it), and the
standalone page `picochat attention RUN "question" --image FILE` writes."""
from __future__ import annotations

import re

import pytest

from tests.inspect.test_html import open_file
from tests.serve.test_attention_pictures import scene
from tests.serve.test_web import (answered, artifacts_dir, chromium_browser, last_assistant,  # noqa: F401
                                  open_page, send, set_max_tokens, wait_js)

pytestmark = pytest.mark.slow

VIEWER = "#attention-dialog [data-testid=attention-viewer]"
# the overlay's heat: pixels of the overlay colour (rgb 255, 69, 0 at some opacity), and a fingerprint
HEAT = """(root) => { const c = document.querySelector(`${root} [data-testid=attn-picture-overlay]`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let heat = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 8 && d[i] > 200 && d[i + 2] < 60) heat++;
    hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2] + 17 * d[i + 3]) | 0;
  }
  return {heat, hash, w: c.width, h: c.height}; }"""
LOADED = "(() => { const i = document.querySelector('%s [data-testid=attn-picture-img]'); return !!(i && i.complete && i.naturalWidth); })()"


def caption(page, root: str) -> str:
    return page.inner_text(f"{root} [data-testid=attn-picture-caption]")


def test_attention_dialog_draws_over_the_picture(vlm_server, chromium_browser):
    ctx, page, errors = open_page(chromium_browser, vlm_server.url, viewport={"width": 1280, "height": 900})
    try:
        page.select_option("#model-select", "tiny-vlm")
        set_max_tokens(page, 8)
        page.locator("[data-testid=image-input]").set_input_files(
            {"name": "shape.png", "mimeType": "image/png", "buffer": scene()})
        page.wait_for_selector("[data-testid=attachment] img")
        answered(page, lambda: send(page, "What colour is the shape?"))
        last_assistant(page).locator("[data-testid=attention]").click()
        page.wait_for_selector(f"{VIEWER}[data-rendered]")
        wait_js(page, LOADED % VIEWER)
        assert page.eval_on_selector(f"{VIEWER} [data-testid=attn-picture-img]", "i => i.naturalWidth") == 40
        assert page.is_visible(f"{VIEWER} [data-testid=attn-picture-overlay]")
        assert page.is_hidden(f"{VIEWER} [data-testid=attn-image]")  # (the ViT's canvas)
        # the answer's first token, chosen at first: its attention over the picture's 9 image tokens
        first = page.evaluate(HEAT, VIEWER)
        assert first["heat"] > 500 and first["w"] >= 240, first
        text = caption(page, VIEWER)
        assert re.search(r"gives \d+(\.\d)?% of its attention to picture 1 \(9 image tokens, a 3\u00D73 grid\)", text), text
        page.screenshot(path=str(artifacts_dir() / "10-attention-picture.png"))

        page.select_option(f"{VIEWER} [data-testid=attn-head]", "1")  # another head looks elsewhere
        wait_js(page, f"document.querySelector('{VIEWER}').dataset.head === '1'")
        assert page.evaluate(HEAT, VIEWER)["hash"] != first["hash"]
        # the first token of the conversation comes before the picture: it cannot look at it
        page.locator(f"{VIEWER} [data-testid=attn-lines]").click(position={"x": 10, "y": 13})
        assert "comes before picture 1" in caption(page, VIEWER) and page.evaluate(HEAT, VIEWER)["heat"] == 0
        # a cell of the picture chosen: that image token, and what it looked at
        page.locator(f"{VIEWER} [data-testid=attn-picture-overlay]").click(position={"x": 200, "y": 200})
        assert caption(page, VIEWER).startswith('"<image1:r2c2>"'), caption(page, VIEWER)
        page.click("[data-testid=attention-close]")

        # after a reload the stored picture is fetched from /api/images/{id} (as pictures.js fetches it)
        fetched = []
        page.on("request", lambda r: fetched.append(r.url))
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        last_assistant(page).locator("[data-testid=attention]").click()
        page.wait_for_selector(f"{VIEWER}[data-rendered]")
        wait_js(page, LOADED % VIEWER)
        assert page.evaluate(HEAT, VIEWER)["heat"] > 500 and [u for u in fetched if "/api/images/" in u]
        assert not errors, errors  # includes anything the Content-Security-Policy blocked
    finally:
        ctx.close()


def test_standalone_page_draws_over_the_picture(tiny_vlm_run, chromium_browser, tmp_path):  # noqa: F811
    import torch

    from picochat.inspect.cli import AttentionConfig, attention
    (tmp_path / "shape.png").write_bytes(scene())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = attention(AttentionConfig(model=str(tiny_vlm_run), text="What colour is the shape?",
                                        image=str(tmp_path / "shape.png"), out_dir=str(tmp_path / "maps")))
    finally:
        torch.set_num_threads(threads)
    ctx, page, problems, requests = open_file(chromium_browser, tmp_path / "maps" / "attention.html")
    try:
        root = "[data-testid=attention-viewer]"
        wait_js(page, LOADED % root)
        # the page's picture is the square the model's grid covers: 40x30 padded to 40x40
        assert page.eval_on_selector(f"{root} [data-testid=attn-picture-img]", "i => i.naturalWidth") == 40
        assert page.evaluate(HEAT, root)["heat"] > 500
        assert "of its attention to picture 1" in caption(page, root)
        assert f"question: {out['meta']['question']}" in page.inner_text(root)
        assert problems == [] and requests == [(tmp_path / "maps" / "attention.html").as_uri()]
    finally:
        ctx.close()
