"""The page's conversation tools in a real browser: search by title and content, rename, the stats line under an
answer, keyboard shortcuts, the token view whose hover shows each token's probability and alternatives, and
export then import (the copy opens with its messages and its rating)."""
from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import pytest

from tests.serve.test_web import (answered, chromium_browser, conversation_id, last_assistant,  # noqa: F401
                                  open_page, send, set_max_tokens, wait_js)

pytestmark = pytest.mark.slow


def test_search_rename_stats_shortcuts_and_token_hover(tiny_server, chromium_browser):  # noqa: F811
    url = tiny_server.url
    ctx, page, errors = open_page(chromium_browser, url, viewport={"width": 1280, "height": 820})
    try:
        set_max_tokens(page, 12)
        # a seed the answer is known to start with a token under (the tiny model often ends its turn at once:
        # 0 tokens, no stats); it also checks the settings panel's seed reaches the request, and the store
        page.click("#settings-toggle")
        page.fill("#seed", "1")
        page.click("#settings-toggle")
        answered(page, lambda: send(page, "Tell me about the harbour of Lisbon"))
        first = conversation_id(page)

        # the stats line: the answer's token count, time to first token and speed, as the server stored them
        stats = last_assistant(page).locator("[data-testid=message-stats]").inner_text()
        stored = [m for m in httpx.get(f"{url}/api/conversations/{first}").json()["messages"] if m["role"] == "assistant"][0]
        assert stored["settings"]["seed"] == 1 and stored["completion_tokens"] > 0
        assert stats.startswith(f"{stored['completion_tokens']} token") and "first token" in stats
        # as JavaScript's toFixed(1) rounds: a tie (205.25) goes up, where Python's format goes to even
        speed = Decimal(stored['settings']['timing']['tokens_per_s']).quantize(Decimal("0.1"), ROUND_HALF_UP)
        assert f"{speed} tokens/s" in stats

        # Ctrl+Shift+O: a new chat, the message box focused; a second conversation
        page.click("#messages")
        page.keyboard.press("Control+Shift+O")
        wait_js(page, "location.hash === '' || location.hash === '#'")
        assert page.evaluate("document.activeElement.id") == "prompt"
        answered(page, lambda: send(page, "Something about Porto"))
        second = conversation_id(page)
        assert second != first
        page.click("#messages")
        page.keyboard.press("Shift+Escape")
        assert page.evaluate("document.activeElement.id") == "prompt"

        # rename the open conversation from the top bar
        page.click("[data-testid=rename]")
        page.fill("[data-testid=title-input]", "Northern trip")
        page.press("[data-testid=title-input]", "Enter")
        wait_js(page, "document.querySelector('#conversation-title').textContent === 'Northern trip'")
        assert httpx.get(f"{url}/api/conversations/{second}").json()["title"] == "Northern trip"
        wait_js(page, "[...document.querySelectorAll('.conv-name')].some(n => n.textContent === 'Northern trip')")

        # search: by title, by a message's content, and nothing
        def listed(q: str) -> list[str]:
            page.fill("[data-testid=conversation-search]", q)
            page.wait_for_timeout(400)  # (the search is debounced)
            return page.eval_on_selector_all("[data-testid=conversation-item]", "xs => xs.map(x => x.dataset.id)")
        assert listed("northern") == [second]
        assert listed("harbour of lisbon") == [first]
        assert listed("no such words anywhere") == []
        assert set(listed("")) >= {first, second}

        # the token view: each token tinted, its hover gives its probability and the alternatives
        page.click(f"[data-testid=conversation-item][data-id='{first}'] [data-testid=open-conversation]")
        wait_js(page, f"location.hash === '#/c/{first}'")
        last_assistant(page).locator("[data-testid=tokens]").click()
        page.wait_for_selector("[data-testid=token-view] [data-testid=token]", state="attached")
        want = httpx.get(f"{url}/api/messages/{stored['id']}/tokens?top=5").json()["tokens"]
        spans = last_assistant(page).locator("[data-testid=token]")
        assert spans.count() == len(want)
        spans.nth(0).hover()
        page.wait_for_selector("[data-testid=token-tip]:not([hidden])")
        head = page.inner_text("[data-testid=token-tip-chosen]")
        assert f"{100 * math.exp(want[0]['logprob']):.1f}%" in head
        assert page.locator("[data-testid=token-tip-alt]").count() == 5
        page.mouse.move(5, 5)
        wait_js(page, "document.querySelector('#token-tip').hidden")
        last_assistant(page).locator("[data-testid=tokens]").click()  # back to the rendered answer
        page.wait_for_selector("[data-testid=token-view]", state="detached")

        # export then import: the copy opens with its messages and its feedback
        last_assistant(page).locator("[data-testid=thumb-up]").click()
        wait_js(page, "document.querySelector('#messages [data-role=assistant] [data-testid=thumb-up]')"
                      ".getAttribute('aria-pressed') === 'true'")
        with page.expect_download() as dl:
            page.click("[data-testid=export]")
        path = dl.value.path()
        doc = json.loads(Path(path).read_text())
        assert doc["format"] == "picochat-conversation" and doc["messages"][1]["rating"] == 1
        page.set_input_files("[data-testid=import-file]", path)
        wait_js(page, f"location.hash.startsWith('#/c/') && location.hash !== '#/c/{first}'")
        copy = conversation_id(page)
        page.wait_for_selector("#messages [data-role=assistant]")
        texts = page.eval_on_selector_all("#messages [data-testid=message] .msg-body", "xs => xs.map(x => x.innerText)")
        assert texts[0] == "Tell me about the harbour of Lisbon" and len(texts) == 2
        assert last_assistant(page).locator("[data-testid=thumb-up]").get_attribute("aria-pressed") == "true"
        assert httpx.get(f"{url}/api/conversations/{copy}").json()["messages"][1]["rating"] == 1
        with page.expect_download() as dl_all:
            page.click("[data-testid=export-all]")
        everything = json.loads(Path(dl_all.value.path()).read_text())
        assert {c["title"] for c in everything["conversations"]} >= {"Northern trip"}
        assert not errors, errors
    finally:
        ctx.close()
