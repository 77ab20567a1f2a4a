"""The web page of `picochat serve` in a real browser (Debian's chromium driven by playwright).

One walk through the page against a running server with a tiny random model: send (the answer
streams in), regenerate, compare two answers and pick one (a ranking lands in the store), thumbs up,
edit and resend, stop, an error from the server shown in the page, reload and reopen from the list,
delete; the same page at phone width; and the API-key dialog. Screenshots go to
$PICOCHAT_ARTIFACTS/web (default test-artifacts/web).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, picochat_cmd, subprocess_env
from tests.serve.conftest import ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


def artifacts_dir() -> Path:
    out = Path(os.environ.get("PICOCHAT_ARTIFACTS") or ROOT / "test-artifacts") / "web"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def chromium_browser():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install -y chromium); the browser test needs it"
        if os.environ.get("CI"):  # `make test` installs it in CI: a missing browser there is a failure
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str, **context_args):
    ctx = browser.new_context(**context_args)
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # anything the page's Content-Security-Policy blocks is a bug too
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return ctx, page, errors


def wait_js(page, expression: str, timeout: float = TIMEOUT_MS) -> None:
    """page.wait_for_function evaluates its string with eval(), which the page's CSP forbids (no
    'unsafe-eval'); page.evaluate goes through the DevTools protocol, outside the CSP."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise PlaywrightTimeout(f"timed out after {timeout} ms waiting for: {expression}")
        page.wait_for_timeout(50)


def conversation_id(page) -> str:
    h = page.evaluate("location.hash")
    assert h.startswith("#/c/"), h
    return h[len("#/c/"):]


def answered(page, action):
    """Runs action (which starts a generation) and waits until the answer has streamed and the page
    has reloaded the conversation (message ids known): body[data-generated] counts generations."""
    n = int(page.get_attribute("body", "data-generated"))
    action()
    wait_js(page, f"Number(document.body.dataset.generated) > {n} && document.body.dataset.busy === '0'")


# records, per generation, the lengths of the streaming answer's text and whether Stop was shown
WATCH_STREAM = """() => {
  window.__stream = {lengths: {}, stopSeen: {}};
  const obs = new MutationObserver(() => {
    const g = document.body.dataset.generated;
    const s = document.querySelector('[data-testid=streaming-message] .msg-body');
    if (s) (window.__stream.lengths[g] ??= []).push(s.textContent.length);
    if (!document.querySelector('#stop').hidden) window.__stream.stopSeen[g] = true;
  });
  obs.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def set_max_tokens(page, n: int):
    """Through the settings panel, as a user would: shorter answers keep a browser test quick."""
    page.click("#settings-toggle")
    page.fill("#max_tokens", str(n))
    page.click("#settings-toggle")


def send(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_assistant(page):
    return page.locator("#messages [data-testid=message][data-role=assistant]").last


def get_conv(url: str, cid: str) -> dict:
    r = httpx.get(f"{url}/api/conversations/{cid}", timeout=10)
    r.raise_for_status()
    return r.json()


def run_chat_flow(browser, url: str, db: Path, out: Path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    ctx, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 820})
    models = page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)")
    assert models, "the model picker is empty"

    # settings panel: defaults come from /api/config; a shorter answer keeps the test quick
    page.click("#settings-toggle")
    assert page.input_value("#temperature") != ""
    page.fill("#max_tokens", "60")
    # a flat distribution: the ranking in step 3 needs two different answers (an export refuses a pair of
    # equal ones, and at the default temperature the tiny model once gave the same answer twice)
    page.fill("#temperature", "1.5")
    page.dispatch_event("#temperature", "change")
    page.fill("#system-prompt", "You are a terse assistant.")
    page.click("#settings-toggle")

    # 1. send: the answer streams in (the text grows, the stop button shows while it does)
    page.evaluate(WATCH_STREAM)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    answered(page, lambda: send(page, "Hello! Tell me something about **cats**."))
    assert page.evaluate("window.__stream.stopSeen['0']"), "the stop button never showed during generation"
    first = last_assistant(page)
    first_id = int(first.get_attribute("data-id"))
    cid = conversation_id(page)
    page.wait_for_selector(f"#conversation-list [data-testid=conversation-item][data-id='{cid}']")
    conv = get_conv(url, cid)
    by_id = {m["id"]: m for m in conv["messages"]}
    user_id = by_id[first_id]["parent_id"]
    assert by_id[user_id]["role"] == "user" and by_id[user_id]["content"].startswith("Hello!")
    assert conv["system_prompt"] == "You are a terse assistant."
    body = sent[0]  # what the page asked for: the OpenAI request with the settings and the tree position
    assert body["stream"] is True and body["model"] == models[0] and body["max_tokens"] == 60
    assert body["temperature"] == 1.5
    assert body["messages"] == [{"role": "system", "content": "You are a terse assistant."},
                                {"role": "user", "content": "Hello! Tell me something about **cats**."}]
    assert body["metadata"] == {"conversation_id": cid, "parent_id": str(user_id)}
    page.screenshot(path=str(out / "01-answer.png"))

    # 2. regenerate: a second answer to the same user message, "2/2" shown
    answered(page, lambda: first.locator("[data-testid=regenerate]").click())
    page.wait_for_selector("#messages [data-role=assistant] [data-testid=sibling-pos]:has-text('2/2')")
    answers = [m for m in get_conv(url, cid)["messages"] if m["parent_id"] == user_id]
    assert len(answers) == 2 and all(m["role"] == "assistant" for m in answers)
    # switch back and forth between the two
    last_assistant(page).locator("[data-testid=sibling-prev]").click()
    assert last_assistant(page).get_attribute("data-id") == str(first_id)
    last_assistant(page).locator("[data-testid=sibling-next]").click()

    # 3. compare: a third answer beside the shown one; pick the better -> a ranking
    shown_id = int(last_assistant(page).get_attribute("data-id"))
    answered(page, lambda: last_assistant(page).locator("[data-testid=compare]").click())
    page.wait_for_selector("[data-testid=compare-view]:not([hidden])")
    page.wait_for_selector("[data-testid=choose-better] >> nth=1")
    assert page.locator("[data-testid=compare-column]").count() == 2
    page.screenshot(path=str(out / "02-compare.png"))
    choose = page.locator("[data-testid=choose-better]").nth(1)
    chosen_id = int(choose.get_attribute("data-id"))
    assert chosen_id != shown_id
    choose.click()
    page.wait_for_selector("[data-testid=compare-view]", state="hidden")
    assert last_assistant(page).get_attribute("data-id") == str(chosen_id)
    answers = [m for m in get_conv(url, cid)["messages"] if m["parent_id"] == user_id]
    assert len(answers) == 3

    # 4. thumbs up on the chosen answer
    last_assistant(page).locator("[data-testid=thumb-up]").click()
    page.wait_for_selector("#messages [data-role=assistant] [data-testid=thumb-up][aria-pressed=true]")
    rated = {m["id"]: m["rating"] for m in get_conv(url, cid)["messages"]}
    assert rated[chosen_id] == 1

    # the ranking is in the store: the feedback export has it
    export = out / "feedback.jsonl"
    subprocess.run(picochat_cmd("feedback", "export", str(export), "--db", str(db)), env=subprocess_env(),
                   check=True, capture_output=True, timeout=120)
    pairs = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    ours = [p for p in pairs if p.get("conversation_id") == cid and p["source"] == "ranking"]
    assert len(ours) == 1, pairs
    texts = {m["id"]: m["content"] for m in get_conv(url, cid)["messages"]}
    assert ours[0]["chosen"][-1]["content"] == texts[chosen_id]
    assert ours[0]["rejected"][-1]["content"] == texts[shown_id]

    # 5. a follow-up, then edit it and resend: a sibling user message with its own answer
    answered(page, lambda: send(page, "And dogs?"))
    user2 = page.locator("#messages [data-testid=message][data-role=user]").last
    user2.locator("[data-testid=edit]").click()
    page.fill("[data-testid=edit-input]", "And what about birds?")
    answered(page, lambda: page.click("[data-testid=edit-save]"))
    page.wait_for_selector("#messages [data-role=user]:has-text('birds')")
    page.wait_for_selector("#messages [data-role=user] [data-testid=sibling-pos]:has-text('2/2')")
    msgs = get_conv(url, cid)["messages"]
    follow_ups = [m for m in msgs if m["role"] == "user" and m["parent_id"] == chosen_id]
    assert sorted(m["content"] for m in follow_ups) == ["And dogs?", "And what about birds?"]
    birds = next(m for m in follow_ups if "birds" in m["content"])
    assert any(m["parent_id"] == birds["id"] and m["role"] == "assistant" for m in msgs)

    # 6. stop, in a new chat (the gibberish history would soon fill the tiny model's 512 tokens):
    # the answer ends early (or had already ended) and the page is usable again
    page.click("#new-chat")
    assert page.locator("#messages [data-testid=message]").count() == 0
    assert page.evaluate("location.hash") == "" and page.is_visible("[data-testid=empty]")
    page.click("#settings-toggle")
    page.fill("#max_tokens", "400")
    page.dispatch_event("#max_tokens", "change")
    def send_and_stop():
        send(page, "Write a long story.")
        try:  # stop once the first words are on screen (the server then stores what it generated)
            wait_js(page, "(document.querySelector('[data-testid=streaming-message] .msg-body')"
                          "?.textContent.length ?? 0) > 0", timeout=10_000)
            page.locator("#stop").click(timeout=2_000)
        except PlaywrightTimeout:  # the tiny model was quicker than the click
            pass
    answered(page, send_and_stop)
    stopped = last_assistant(page)
    stopped.wait_for()
    assert page.is_hidden("[data-testid=error]"), page.inner_text("[data-testid=error]")
    cid2 = conversation_id(page)
    assert cid2 != cid
    msgs = get_conv(url, cid2)["messages"]
    story = next(m for m in msgs if m["content"] == "Write a long story.")
    answer = [m for m in msgs if m["parent_id"] == story["id"]]
    assert len(answer) == 1 and answer[0]["finish_reason"] in ("cancelled", "stop", "length"), msgs
    assert stopped.get_attribute("data-id") == str(answer[0]["id"])
    assert stopped.get_attribute("data-finish") == answer[0]["finish_reason"]

    # 7. an error from the server shows in the page (temperature out of range: a 400)
    page.fill("#temperature", "5")
    page.dispatch_event("#temperature", "change")
    send(page, "This one fails.")
    page.wait_for_selector("[data-testid=error]:not([hidden])")
    assert "temperature" in page.inner_text("[data-testid=error]")
    page.click("#error-close")
    page.click("#settings-reset")
    assert float(page.input_value("#temperature")) <= 2
    page.click("#settings-toggle")

    # the answers grew while they streamed (a random model may stop after a token or two, so not
    # every answer has to; over seven of them at least one does)
    stream = page.evaluate("window.__stream")
    assert len(stream["stopSeen"]) >= 6, stream
    growth = [len(set(n for n in lengths if n > 0)) for lengths in stream["lengths"].values()]
    assert max(growth) >= 3, f"no answer grew while streaming: {stream}"

    # 8. reload a fresh page: the conversation is in the list; open it
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#messages [data-testid=message]").count() == 0
    item = page.locator(f"#conversation-list [data-testid=conversation-item][data-id='{cid}']")
    item.locator("[data-testid=open-conversation]").click()
    page.wait_for_selector("#messages [data-testid=message][data-role=assistant]")
    assert conversation_id(page) == cid
    assert "Hello!" in page.inner_text("#messages")
    page.screenshot(path=str(out / "03-reopened.png"))
    assert not errors, errors
    ctx.close()
    return cid


def run_phone(browser, url: str, cid: str, out: Path):
    ctx, page, errors = open_page(browser, url, viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    assert not page.is_visible("#conversation-list"), "the sidebar should be collapsed at phone width"
    page.screenshot(path=str(out / "04-phone-empty.png"))
    page.click("#sidebar-toggle")
    item = page.locator(f"#conversation-list [data-testid=conversation-item][data-id='{cid}']")
    item.wait_for(state="visible")
    wait_js(page, "document.querySelector('#sidebar').getBoundingClientRect().left >= 0")
    page.screenshot(path=str(out / "05-phone-sidebar.png"))
    item.locator("[data-testid=open-conversation]").click()
    page.wait_for_selector("#messages [data-testid=message][data-role=assistant]")
    # the drawer slides away (0.2 s)
    wait_js(page, "document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    # nothing wider than the screen
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    page.screenshot(path=str(out / "06-phone-chat.png"))
    # send from the phone too
    answered(page, lambda: send(page, "Short one from the phone"))
    # delete the conversation (two clicks: the first one asks)
    page.click("#sidebar-toggle")
    delete = item.locator("[data-testid=delete-conversation]")
    delete.click()
    delete.click()
    item.wait_for(state="detached")
    assert httpx.get(f"{url}/api/conversations/{cid}", timeout=10).status_code == 404
    assert not errors, errors
    ctx.close()


def test_web_page(tiny_server, chromium_browser):
    browser = chromium_browser
    out = artifacts_dir()
    r = httpx.get(tiny_server.url + "/", timeout=10)
    assert r.status_code == 200 and "picochat" in r.text
    for f in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(f"{tiny_server.url}/static/{f}", timeout=10).status_code == 200
    cid = run_chat_flow(browser, tiny_server.url, tiny_server.db, out)
    run_phone(browser, tiny_server.url, cid, out)


def test_web_markdown_escapes_html(tiny_server, chromium_browser):
    """The renderer escapes model output: markup in an answer is shown as text, never run."""
    browser = chromium_browser
    ctx, page, errors = open_page(browser, tiny_server.url)
    html = page.evaluate("""async () => {
      const { renderMarkdown } = await import('/static/markdown.js');
      return renderMarkdown('# Hi\\n**b** *i* `<x>`\\n\\n<img src=x onerror=alert(1)>\\n\\n- a\\n- b\\n\\n'
        + '```python\\nprint(\"<script>\")\\n```\\n[ok](https://example.com) [bad](javascript:alert(1))');
    }""")
    assert "<img" not in html and "&lt;img" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<h1>Hi</h1>" in html and "<strong>b</strong>" in html and "<em>i</em>" in html
    assert "<code>&lt;x&gt;</code>" in html and "<ul><li>a</li><li>b</li></ul>" in html
    assert 'data-testid="copy-code"' in html and 'language-python"' in html
    assert 'href="https://example.com"' in html and 'href="javascript' not in html
    assert not errors, errors
    ctx.close()


MATH_AND_CODE = (r"Euler: $e^{i\pi} + 1 = 0$ and \(a^2 + b^2 = c^2\). It costs $5 and $10." "\n\n"
                 "$$\n" r"\int_0^1 x^2\,dx = \frac{1}{3}" "\n$$\n\n" r"Broken: $\frac{1$ here." "\n\n"
                 "```python\ndef area(r):\n    return 3.14 * r ** 2  # a comment\n```")


def test_web_code_is_highlighted_and_math_rendered(tiny_server, chromium_browser):
    """Vendored highlight.js and KaTeX (MathML): keywords coloured, formulas drawn by the browser, prices left
    as text, a broken formula shown as its source; nothing the page's CSP refuses."""
    ctx, page, errors = open_page(chromium_browser, tiny_server.url, viewport={"width": 1000, "height": 800})
    try:
        info = page.evaluate("""async (src) => {
          const { renderMarkdown } = await import('/static/markdown.js');
          document.querySelector('#messages').innerHTML =
            '<div class="msg msg-assistant"><div class="avatar">\u03C0</div><div class="msg-body markdown" id="probe">'
            + renderMarkdown(src) + '</div></div>';
          document.querySelector('#empty').hidden = true;
          const probe = document.querySelector('#probe');
          const kw = probe.querySelector('.hljs-keyword'), plain = probe.querySelector('pre code');
          const maths = [...probe.querySelectorAll('math')];
          return {keyword: kw && kw.textContent, kwColor: kw && getComputedStyle(kw).color,
                  codeColor: getComputedStyle(plain).color, comment: !!probe.querySelector('.hljs-comment'),
                  maths: maths.length, sizes: maths.map(m => m.getBoundingClientRect().width),
                  block: !!probe.querySelector('[data-testid=math-block] math[display=block]'),
                  text: probe.innerText, broken: probe.querySelector('code.math-error')?.textContent};
        }""", MATH_AND_CODE)
        assert info["keyword"] in ("def", "return") and info["comment"] and info["kwColor"] != info["codeColor"]
        assert info["maths"] == 3 and all(w > 5 for w in info["sizes"]) and info["block"], info
        assert "It costs $5 and $10." in info["text"] and info["broken"] == r"\frac{1", info
        page.screenshot(path=str(artifacts_dir() / "code_and_math.png"))
        assert not errors, errors
    finally:
        ctx.close()


def test_web_api_key(tiny_chat_ckpt, chromium_browser, tmp_path):
    """With --api-key the page asks for the key once, keeps it in localStorage and sends it."""
    browser = chromium_browser
    srv = ServerProcess(str(tiny_chat_ckpt), "--api-key", "s3cret", db=tmp_path / "auth.db")
    try:
        ctx = browser.new_context()
        ctx.set_default_timeout(TIMEOUT_MS)
        page = ctx.new_page()
        page.goto(srv.url)
        page.wait_for_selector("[data-testid=api-key-dialog][open]")
        page.fill("#api-key-input", "wrong")
        page.click("#api-key-save")
        page.wait_for_selector("[data-testid=api-key-dialog][open]")  # refused: asked again
        page.fill("#api-key-input", "s3cret")
        page.click("#api-key-save")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#model-select option").count() >= 1
        assert page.evaluate("localStorage.getItem('picochat.apiKey')") == "s3cret"
        page.click("#settings-toggle")
        page.fill("#max_tokens", "20")
        answered(page, lambda: send(page, "hi"))
        last_assistant(page).wait_for()
        assert page.is_hidden("[data-testid=error]")
        page.screenshot(path=str(artifacts_dir() / "07-api-key.png"))
        ctx.close()
    finally:
        srv.stop()


def test_web_long_conversation_drops_oldest_turns(tiny_server, chromium_browser):
    """A chat longer than the model's context (512 tokens here) keeps working: the oldest turns are
    left out of the prompt and the page says so."""
    ctx, page, errors = open_page(chromium_browser, tiny_server.url)
    try:
        page.evaluate("""() => {  // remember every toast, however briefly shown
          window.__toasts = [];
          new MutationObserver(() => { const t = document.querySelector('#toast');
            if (t && t.textContent) window.__toasts.push(t.textContent); })
            .observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")
        for i in range(4):  # ~120 tokens a question on the tiny tokenizer, plus the answers
            answered(page, lambda i=i: send(page, f"Question {i}: " + "tell me about the sea " * 20))
        toasts = page.evaluate("window.__toasts")
        assert any("oldest messages were left out" in t for t in toasts), toasts
        assert not page.locator("[data-testid=error]").is_visible()
        assert errors == []
    finally:
        ctx.close()
