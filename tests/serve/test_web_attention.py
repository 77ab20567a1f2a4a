"""The web page's "Attention" button in a real browser: send a message, open the maps of the answer,
switch head and layer (another layer is fetched from the server), all under the page's CSP."""
from __future__ import annotations

import pytest

from tests.serve.test_web import (answered, artifacts_dir, chromium_browser, last_assistant,  # noqa: F401
                                  open_page, send, set_max_tokens, wait_js)
from tests.inspect.test_html import CANVAS

pytestmark = pytest.mark.slow

VIEWER = "#attention-dialog [data-testid=attention-viewer]"


def rendered(page) -> int:
    return int(page.get_attribute(VIEWER, "data-rendered") or 0)


def test_attention_button_opens_the_viewer(tiny_server, chromium_browser):  # noqa: F811
    ctx, page, errors = open_page(chromium_browser, tiny_server.url, viewport={"width": 1280, "height": 900})
    try:
        set_max_tokens(page, 24)
        answered(page, lambda: send(page, "The cat sees the garden."))
        answer = last_assistant(page)
        answer_id = answer.get_attribute("data-id")
        maps = []
        page.on("request", lambda r: maps.append(r.url) if "/attention" in r.url else None)
        answer.locator("[data-testid=attention]").click()
        page.wait_for_selector("[data-testid=attention-dialog][open]")
        page.wait_for_selector(f"{VIEWER}[data-rendered]")
        assert maps == [f"{tiny_server.url}/api/messages/{answer_id}/attention?layer=0"]

        heat = page.evaluate(CANVAS, "attn-heatmap")
        assert heat["drawn"] > 1000 and page.evaluate(CANVAS, "attn-lines")["drawn"] > 100, heat
        assert page.locator(f"{VIEWER} [data-testid=attn-layer] option").count() == 2  # the tiny model's layers
        assert page.locator(f"{VIEWER} [data-testid=attn-head] option").count() == 3  # average + 2 heads
        page.screenshot(path=str(artifacts_dir() / "08-attention.png"))

        n = rendered(page)  # another head: drawn from the data already here
        page.select_option(f"{VIEWER} [data-testid=attn-head]", "1")
        wait_js(page, f"Number(document.querySelector('{VIEWER}').dataset.rendered) > {n}")
        after_head = page.evaluate(CANVAS, "attn-heatmap")
        assert after_head["hash"] != heat["hash"]
        assert len(maps) == 1

        page.select_option(f"{VIEWER} [data-testid=attn-layer]", "1")  # another layer: fetched
        wait_js(page, f"document.querySelector('{VIEWER}').dataset.layer === '1'")
        assert maps[-1].endswith("attention?layer=1")
        assert page.evaluate(CANVAS, "attn-heatmap")["hash"] != after_head["hash"]

        page.click("[data-testid=attention-close]")
        page.wait_for_selector("[data-testid=attention-dialog]", state="hidden")
        assert not errors, errors  # includes anything the Content-Security-Policy blocked
    finally:
        ctx.close()
