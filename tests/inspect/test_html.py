"""write_html: one self-contained page holding the web page's viewer and the maps, that really draws
in headless Chromium (a GPT-like causal view, and a synthetic ViT view with its image overlay)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from picochat.errors import PicochatError
from picochat.inspect.html import MODULES, SIBLING_IMPORT, STATIC, page_html, write_html
from picochat.inspect.maps import AttentionView, MapGroup
from tests.serve.test_web import TIMEOUT_MS, chromium_browser  # noqa: F401 - the shared browser fixture


def causal_view(T: int = 10, L: int = 2, H: int = 3) -> AttentionView:
    torch.manual_seed(0)
    scores = torch.randn(L, H, T, T).masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    toks = [" the", "</script><b>x</b>", "<!--", "\n", "é"] + [f" t{i}" for i in range(T - 5)]
    return AttentionView("gpt", "a <test> & more", {"self": MapGroup(toks, toks, scores.softmax(-1), causal=True)})


def vit_view(rows: int = 4, cols: int = 4) -> AttentionView:
    torch.manual_seed(1)
    n = rows * cols + 1
    toks = ["[CLS]"] + [f"patch {i}" for i in range(rows * cols)]
    pixels = torch.zeros(8, 8)
    pixels[1:7, 3:5] = 1.0  # a "1"
    return AttentionView("vit", "digit 1", {"self": MapGroup(toks, toks, (3 * torch.randn(2, 2, n, n)).softmax(-1))},
                         image={"pixels": pixels.tolist(), "grid": [rows, cols]}, meta={"label": 1})


def seq2seq_view() -> AttentionView:
    """An encoder of 3 layers and a decoder of 2: the layer picker follows the group."""
    torch.manual_seed(2)
    src, tgt = ["four", "hundred", "</s>"], ["<s>", "4", "0", "0"]
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    return AttentionView("seq2seq", "four hundred", {
        "encoder": MapGroup(src, src, torch.randn(3, 2, 3, 3).softmax(-1)),
        "decoder": MapGroup(tgt, tgt, torch.randn(2, 2, 4, 4).masked_fill(causal, float("-inf")).softmax(-1), causal=True),
        "cross": MapGroup(tgt, src, torch.randn(2, 2, 4, 3).softmax(-1))}, meta={"translation": "4 0 0"})


def embedded_json(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def test_page_inlines_the_viewer_and_the_data(tmp_path):
    view = causal_view()
    path = write_html(view, tmp_path / "out" / "attention.html")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["attention.html"]  # no temp file left
    text = path.read_text("utf-8")
    for name in MODULES:  # the page's own viewer, not a copy of it (its modules linked: import lines dropped)
        assert SIBLING_IMPORT.sub("", (STATIC / name).read_text("utf-8")) in text
    assert "import {" not in text
    assert (STATIC / "attention.css").read_text("utf-8") in text
    assert embedded_json(text) == json.loads(json.dumps(view.to_json()))
    # the tokens' markup is data, never markup: the only "</script" are the two the page closes itself
    assert text.lower().count("</script") == 2 and "<!--" not in text
    assert "a &lt;test&gt; &amp; more" in text
    # offline: the markup fetches nothing (no src or href at all; the viewer's script sets an <img>'s src only
    # to a picture's data: URL) and the CSP forbids any other fetch anyway
    markup = re.sub(r'<script type="module">.*?</script>', "", text, flags=re.S)
    assert not re.search(r"\b(src|href)\s*=", markup) and "default-src 'none'" in text


def test_size_limit_and_layer_subset(tmp_path):
    view = causal_view(T=10, L=4, H=2)  # 800 numbers
    with pytest.raises(PicochatError, match="fewer layers"):
        page_html(view, max_numbers=500)
    data = embedded_json(page_html(view, layers=[0, 3], max_numbers=500))
    assert data["layer_ids"] == [0, 3] and data["n_layers"] == 4 and data["groups"]["self"]["layers"] == 2
    full = view.to_json()["groups"]["self"]["weights"]
    assert data["groups"]["self"]["weights"] == [full[0], full[3]]
    with pytest.raises(PicochatError, match="layers 0..3"):
        page_html(view, layers=[4])


# the canvas's pixels: how many are drawn (not transparent, not white), and a fingerprint of them
CANVAS = """(id) => { const c = document.querySelector(`[data-testid=${id}]`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let drawn = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && !(d[i] > 250 && d[i + 1] > 250 && d[i + 2] > 250)) drawn++;
    hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2] + 17 * d[i + 3]) | 0;
  }
  return {drawn, hash, w: c.width, h: c.height}; }"""


def open_file(browser, path):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    problems, requests = [], []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector("[data-testid=attention-viewer][data-rendered]")
    return ctx, page, problems, requests


@pytest.mark.slow
def test_page_draws_in_chromium(chromium_browser, tmp_path):  # noqa: F811
    path = write_html(causal_view(), tmp_path / "attention.html")
    ctx, page, problems, requests = open_file(chromium_browser, path)
    try:
        heat = page.evaluate(CANVAS, "attn-heatmap")
        lines = page.evaluate(CANVAS, "attn-lines")
        assert heat["drawn"] > 500 and lines["drawn"] > 100, (heat, lines)
        assert page.locator("[data-testid=attn-layer] option").count() == 2
        assert page.locator("[data-testid=attn-head] option").count() == 4  # the average and 3 heads
        assert page.locator("[data-testid=attn-image]").is_hidden()  # no image in a text view
        n = int(page.get_attribute("[data-testid=attention-viewer]", "data-rendered"))
        page.select_option("[data-testid=attn-head]", "2")
        assert page.get_attribute("[data-testid=attention-viewer]", "data-head") == "2"
        assert int(page.get_attribute("[data-testid=attention-viewer]", "data-rendered")) > n
        assert page.evaluate(CANVAS, "attn-heatmap")["hash"] != heat["hash"]
        # hovering a cell shows the token pair and its weight
        box = page.locator("[data-testid=attn-heatmap]").bounding_box()
        page.mouse.move(box["x"] + box["width"] - 8, box["y"] + box["height"] - 8)
        tip = page.locator(".attn-tip")
        assert tip.is_visible() and re.search(r"\d\.\d{4}|masked", tip.inner_text())
        page.screenshot(path=str(tmp_path / "html.png"))
        assert problems == [] and requests == [path.as_uri()]
    finally:
        ctx.close()


@pytest.mark.slow
def test_vit_view_draws_the_overlay(chromium_browser, tmp_path):  # noqa: F811
    path = write_html(vit_view(), tmp_path / "vit.html")
    ctx, page, problems, _ = open_file(chromium_browser, path)
    try:
        assert page.locator("[data-testid=attn-image]").is_visible()
        first = page.evaluate(CANVAS, "attn-image")
        assert first["drawn"] > 1000, first
        assert page.get_attribute("[data-testid=attn-group]", "data-testid") == "attn-group"
        # another token (patch 5) looks elsewhere: the overlay changes
        page.evaluate("window.attentionViewer.set({selected: {side: 'q', index: 6}})")
        assert page.evaluate(CANVAS, "attn-image")["hash"] != first["hash"]
        assert "label: 1" in page.inner_text("[data-testid=attention-viewer]")
        assert problems == []
    finally:
        ctx.close()


@pytest.mark.slow
def test_seq2seq_view_switches_groups(chromium_browser, tmp_path):  # noqa: F811
    path = write_html(seq2seq_view(), tmp_path / "seq2seq.html")
    ctx, page, problems, _ = open_file(chromium_browser, path)
    try:
        group = "[data-testid=attn-group]"
        assert page.locator(group).is_visible()
        assert page.eval_on_selector_all(f"{group} option", "os => os.map(o => o.value)") == ["encoder", "decoder", "cross"]
        assert page.locator("[data-testid=attn-layer] option").count() == 3
        before = page.evaluate(CANVAS, "attn-heatmap")
        page.select_option(group, "cross")
        assert page.get_attribute("[data-testid=attention-viewer]", "data-group") == "cross"
        assert page.locator("[data-testid=attn-layer] option").count() == 2
        after = page.evaluate(CANVAS, "attn-heatmap")
        assert after["hash"] != before["hash"] and after["drawn"] > 100
        assert "translation: 4 0 0" in page.inner_text("[data-testid=attention-viewer]")
        assert problems == []
    finally:
        ctx.close()
