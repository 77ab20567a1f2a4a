"""The page's picture button in a real browser, against `picochat serve` of a tiny model that sees beside a
text-only one: the button is there only for the model that sees; a GIF and a 21 MB file are refused in the
page; a picture attached (thumbnail, remove, attach again) goes with the message, shows in it, is still shown
after a reload, and is sent again when the answer is regenerated then."""
from __future__ import annotations

import pytest

from tests.serve.conftest import png_bytes
from tests.serve.test_web import (answered, artifacts_dir, chromium_browser, conversation_id,  # noqa: F401
                                  get_conv, last_assistant, open_page, send, set_max_tokens,
                                  wait_js)

pytestmark = pytest.mark.slow

# a 21 MB file picked, made in the page (sending 21 MB through the DevTools protocol takes seconds)
PICK_BIG = """() => {
  const dt = new DataTransfer();
  dt.items.add(new File([new Uint8Array(21 * 2 ** 20)], "big.png", { type: "image/png" }));
  const input = document.querySelector("[data-testid=image-input]");
  input.files = dt.files;
  input.dispatchEvent(new Event("change"));
}"""
SHOWN = "#messages [data-role=user] img[data-testid=message-image]"


def shown_width(page) -> int:
    """naturalWidth of the picture in the user's message, once it has loaded (0: not shown)."""
    page.wait_for_selector(SHOWN)
    wait_js(page, "(() => { const i = document.querySelector(%r); return !!(i && i.complete && i.src); })()" % SHOWN)
    return page.eval_on_selector(SHOWN, "img => img.naturalWidth")


def test_attach_send_reload_regenerate(vlm_server, chromium_browser, tmp_path):  # noqa: F811
    url = vlm_server.url
    ctx, page, errors = open_page(chromium_browser, url, viewport={"width": 1280, "height": 820})
    try:
        assert page.input_value("#model-select") == "tiny-vlm" and page.is_visible("[data-testid=attach]")
        page.select_option("#model-select", "tiny-chat")
        assert not page.is_visible("[data-testid=attach]")  # a text-only model is offered no picture
        page.select_option("#model-select", "tiny-vlm")
        set_max_tokens(page, 8)

        # refused in the page, before any upload: not PNG/JPEG, over 20 MB
        picker = page.locator("[data-testid=image-input]")
        picker.set_input_files({"name": "cat.gif", "mimeType": "image/gif", "buffer": b"GIF89a"})
        page.wait_for_selector("[data-testid=error]:not([hidden])")
        assert "cat.gif is not a PNG or JPEG picture" in page.inner_text("#error-text")
        page.evaluate(PICK_BIG)
        wait_js(page, "document.querySelector('#error-text').textContent.includes('big.png')")
        assert "big.png is 21.0 MB; pictures up to 20 MB" in page.inner_text("#error-text")
        assert page.locator("[data-testid=attachment]").count() == 0
        page.click("#error-close")

        # attach: a thumbnail with a remove button; removed; attached again
        pic = png_bytes((220, 40, 40), size=(48, 36))
        picker.set_input_files({"name": "red.png", "mimeType": "image/png", "buffer": pic})
        page.wait_for_selector("[data-testid=attachment] img")
        page.click("[data-testid=attachment-remove]")
        assert page.locator("[data-testid=attachment]").count() == 0
        picker.set_input_files({"name": "red.png", "mimeType": "image/png", "buffer": pic})
        page.wait_for_selector("[data-testid=attachment] img")
        page.select_option("#model-select", "tiny-chat")  # the picture cannot go to this one: said so
        assert "tiny-chat cannot see pictures" in page.inner_text("[data-testid=attachment-note]")
        page.select_option("#model-select", "tiny-vlm")
        assert page.locator("[data-testid=attachment-note]").count() == 0

        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
        answered(page, lambda: send(page, "Describe the picture."))
        assert page.locator("[data-testid=attachment]").count() == 0  # sent with the message
        assert shown_width(page) == 48
        cid = conversation_id(page)
        conv = get_conv(url, cid)
        user, answer = conv["messages"][0], conv["messages"][1]
        assert user["content"] == "Describe the picture." and user["images"][0]["width"] == 48
        assert answer["role"] == "assistant" and answer["parent_id"] == user["id"] and answer["model"] == "tiny-vlm"
        assert sent[0]["messages"][-1]["content"][0]["type"] == "image_url"
        page.screenshot(path=str(artifacts_dir() / "09-picture.png"))

        # reload: the stored picture is fetched and shown again
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert shown_width(page) == 48
        # regenerate after the reload: the page sends the stored picture again, the server takes it as
        # the stored conversation (same bytes), and stores a second answer under the same message
        answered(page, lambda: last_assistant(page).locator("[data-testid=regenerate]").click())
        page.wait_for_selector("#messages [data-role=assistant] [data-testid=sibling-pos]:has-text('2/2')")
        assert sent[-1]["messages"][-1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        answers = [m for m in get_conv(url, cid)["messages"] if m["parent_id"] == user["id"]]
        assert len(answers) == 2 and all(m["role"] == "assistant" for m in answers)
        assert page.is_hidden("[data-testid=error]"), page.inner_text("#error-text")
        assert not errors, errors  # includes anything the Content-Security-Policy blocked
    finally:
        ctx.close()
