"""The web page's Markdown renderer (picochat/serve/static/markdown.js) on hostile model output.

Issue 8, finding 5: the renderer was quadratic (lazy regexes rescanning the rest of the text from
every unmatched `[`, `**`, backtick run...; a heading regex was cubic on a run of spaces) and
recursive (one stack frame per `>`), so an answer could freeze the tab for minutes or make its
conversation impossible to open; and Chromium's own layout is quadratic in the lines of a
paragraph when spaces surround its line breaks (so lines are trimmed, and what lies beyond
MARKDOWN_LIMIT is a code block). Finding 12: a code span inside a link's url put <code> into the
href. Fast unit tests run the module in node; the browser tests run it in headless Chromium, inside
the page and in a stored conversation opened from the server.

Timed assertions: a freeze is the failure here, so a few tests require a 1 MB pathological input to
render within LIMIT_S. The bound is generous on purpose (the linear renderer takes well under a
second, the old one minutes to hours) so that a busy machine never makes them flaky.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.serve.test_web import chromium_browser, open_page  # noqa: F401 (the fixture)

MARKDOWN_JS = Path(__file__).parents[2] / "picochat" / "serve" / "static" / "markdown.js"
LIMIT_S = 5.0
OPEN_S = 30.0  # loading the page, fetching a 1 MB conversation, rendering and laying it out
MB = 1_000_000

# name -> (prefix, unit, suffix): the input is prefix + unit repeated to about 1 MB + suffix.
# All but three took the old renderer from seconds to hours at 1 MB, or overflowed its stack (the
# quotes); list-markers, list-indent and many-lines were fine and guard the block loops.
PATHOLOGICAL = {
    "link-openers": ("", "[a](", ""),
    "math-dollars": ("", "$a ", ""),                # (math: an opener each, none closes)
    "math-parens": ("", "\\(a ", ""),
    "math-display-lines": ("", "$$x\n", ""),       # every line opens a display block that never closes
    "math-prices": ("", "$5 and ", ""),
    "link-texts": ("", "[", ""),
    "link-urls": ("", "[a](http://x", ""),
    "code-run-lengths": ("", None, ""),  # `a``a```a...: every run length once, none closed
    "bold-no-closer": ("", "**a ", ""),
    "underscore-bold": ("", "__a", ""),
    "strike-no-closer": ("", "~~a ", ""),
    "heading-spaces": ("# a", " ", "x"),
    "fence-spaces": ("```", " ", "!"),
    "quote-depth": ("", ">", " x"),
    "spaced-quote-depth": ("", "> ", "x"),
    "list-markers": ("", "- ", ""),
    "list-indent": ("", "  ", "- x"),
    "list-line-separator": ("- ", " ", "a\u2028"),  # `.` stops at U+2028: \s+(.*)$ backtracked
    "many-lines": ("", "hello *world* `x` [a](https://a.com) __b__ ~~c~~\n", ""),
}

# builds the input in JS from its spec (a megabyte is not passed on a command line)
MAKE_INPUT = """
function makeInput([prefix, unit, suffix], size) {
  if (unit === null) { let s = "", k = 1; while (s.length < size) s += "`".repeat(k++) + "a"; return s; }
  return prefix + unit.repeat(Math.ceil(size / unit.length)) + suffix;
}
"""


def run_node(tmp_path: Path, body: str, timeout: float = 60) -> object:
    """Runs `body` (JS with renderMarkdown/renderInline/MARKDOWN_LIMIT in scope) in node; its
    `out` variable comes back as JSON."""
    if not shutil.which("node"):
        pytest.skip("node is missing")
    script = tmp_path / "t.mjs"
    script.write_text(f"import * as md from {json.dumps(MARKDOWN_JS.as_uri())};\n"
                      "const { renderMarkdown, renderInline } = md;\n" + MAKE_INPUT +
                      f"let out = null;\n{body}\nprocess.stdout.write(JSON.stringify(out));\n")
    try:
        r = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node did not finish rendering within {timeout} s")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def render(tmp_path: Path, text: str) -> str:
    return run_node(tmp_path, f"out = renderMarkdown({json.dumps(text)});")


class Tags(HTMLParser):
    """Start tags with their attributes, and the deepest nesting of each tag."""

    def __init__(self, html: str):
        super().__init__()
        self.starts: list[tuple[str, dict]] = []
        self.open: dict[str, int] = {}
        self.deepest: dict[str, int] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))
        if tag not in ("br", "hr"):
            self.open[tag] = self.open.get(tag, 0) + 1
            self.deepest[tag] = max(self.deepest.get(tag, 0), self.open[tag])

    def handle_endtag(self, tag):
        self.open[tag] = self.open.get(tag, 0) - 1


# ------------------------------------------------------------------------------ node, fast

@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_input_renders_in_linear_time(tmp_path, name):
    """Finding 5: each input renders in well under LIMIT_S at 1 MB, with the Markdown cap lifted
    (`renderMarkdown(text, Infinity)`: the linear core itself) and with the default cap. The old
    renderer took from seconds to hours on most of these, or threw RangeError."""
    got = run_node(tmp_path, f"""
      const text = makeInput({json.dumps(PATHOLOGICAL[name])}, {MB});
      out = {{}};
      for (const [how, limit] of [["uncapped", Infinity], ["default", undefined]]) {{
        const t = performance.now();
        const html = renderMarkdown(text, limit);
        out[how] = {{ s: (performance.now() - t) / 1000, len: html.length }};
      }}""")
    for how, r in got.items():
        assert r["len"] > 0 and r["s"] < LIMIT_S, (how, r)


@pytest.mark.parametrize("text", [">" * 10_000 + " x", "> " * 10_000 + "x", "> a\n>> b\n" * 5_000 + ">" * 3000 + " x"],
                         ids=["run", "spaced-run", "lines-then-run"])
def test_deep_blockquotes_render_without_stack_overflow(tmp_path, text):
    """Finding 5: one stack frame per `>` overflowed the stack (RangeError) and the conversation
    could no longer be opened. Nesting is bounded now; past the bound the rest is plain text."""
    html = render(tmp_path, text)
    tags = Tags(html)
    assert 1 <= tags.deepest["blockquote"] <= 16, tags.deepest
    assert html.rstrip().endswith("x</p>" + "</blockquote>" * tags.deepest["blockquote"]), html[-300:]


def test_deep_lists_nest_a_bounded_number_of_levels(tmp_path):
    text = "\n".join(" " * i + f"- item{i}" for i in range(300))
    html = render(tmp_path, text)
    tags = Tags(html)
    assert tags.deepest["ul"] <= 16, tags.deepest
    assert [t for t, _ in tags.starts].count("li") == 300 and "item299" in html


def test_link_url_holding_a_code_span_is_not_a_link(tmp_path):
    """Finding 12: code spans are parsed before links, so `[x](https://a.com/`b`)` had the code
    span's placeholder in its url and the href came out as "https://a.com/<code>b</code>"."""
    texts = ["[x](https://a.com/`b`)", "[x](https://a.com/``b``)", "[`x`](https://a.com/`y` \"t\")",
             "see [x](https://a.com/`b`) and [y](https://b.com/ok)", "- [x](mailto:`a`@b.c)"]
    for text in texts:
        html = render(tmp_path, text)
        for tag, attrs in Tags(html).starts:
            assert tag != "a" or ("<" not in attrs["href"] and "`" not in attrs["href"]), (text, html)
    assert '<a href="https://b.com/ok"' in render(tmp_path, texts[3])
    # a code span in the link text still works
    assert render(tmp_path, "[`code` text](https://c.com)") == \
        '<p><a href="https://c.com" target="_blank" rel="noopener noreferrer"><code>code</code> text</a></p>'


def test_text_beyond_the_markdown_limit_is_plain_escaped_text(tmp_path):
    """The backstop: the first MARKDOWN_LIMIT characters are Markdown, the rest is plain text in a
    code block (all of it shown, escaped; a <pre> is also what the browser lays out fastest)."""
    got = run_node(tmp_path, """
      const line = "**bold** <b>x</b> [a](https://a.com)\\n";
      const text = line.repeat(Math.ceil(md.MARKDOWN_LIMIT / line.length) + 100);
      out = { lines: text.split("\\n").length - 1, html: renderMarkdown(text), limit: md.MARKDOWN_LIMIT };""")
    html, lines = got["html"], got["lines"]
    head, sep, tail = html.rpartition('<pre><code class="hljs language-text">')
    assert sep and tail.endswith("</code></pre></div>") and "<pre>" not in head
    assert head.count("<strong>bold</strong>") == head.count("bold") > got["limit"] // 50
    assert tail.count("**bold** &lt;b&gt;x&lt;/b&gt; [a](https://a.com)\n") == tail.count("bold") > 50
    assert html.count("bold") == lines and "<b>" not in html


# what the renderer's header comment promises, input -> output
SUPPORTED = [
    ("one\ntwo\n\nthree", "<p>one<br>two</p>\n<p>three</p>"),
    ("# A\n### B ##", "<h1>A</h1>\n<h3>B</h3>"),
    ("**b** *i* _i_ ~~s~~ __b__", "<p><strong>b</strong> <em>i</em> <em>i</em> <del>s</del> <strong>b</strong></p>"),
    ("`a<b` and ``x ` y``", "<p><code>a&lt;b</code> and <code>x ` y</code></p>"),
    ("```py\nif a < b:\n```", '<div class="code-block" data-testid="code-block"><div class="code-head">'
     '<span class="code-lang">py</span><button type="button" class="code-copy" data-testid="copy-code">Copy'
     '</button></div><pre><code class="hljs language-py"><span class="hljs-keyword">if</span> a &lt; b:</code></pre></div>'),
    ("~~~\nopen fence", '<div class="code-block" data-testid="code-block"><div class="code-head">'
     '<span class="code-lang">code</span><button type="button" class="code-copy" data-testid="copy-code">Copy'
     '</button></div><pre><code class="hljs">open fence</code></pre></div>'),
    ("- a\n  - b\n- c\n\n3. x\n4. y",
     '<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul><ol start="3"><li>x</li><li>y</li></ol>'),
    ("> q\n> > r", "<blockquote><p>q</p>\n<blockquote><p>r</p></blockquote></blockquote>"),
    ("a\n\n---", "<p>a</p>\n<hr>"),
    ("[ok](https://a.com/x_y \"t\") [m](mailto:a@b.c) [bad](javascript:alert(1))",
     '<p><a href="https://a.com/x_y" target="_blank" rel="noopener noreferrer">ok</a> '
     '<a href="mailto:a@b.c" target="_blank" rel="noopener noreferrer">m</a> [bad](javascript:alert(1))</p>'),
    ("go https://a.com/b.", '<p>go <a href="https://a.com/b" target="_blank" rel="noopener noreferrer">'
     'https://a.com/b</a>.</p>'),
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    # math: KaTeX's MathML, TeX kept as its annotation; prices stay text; bad TeX stays its source
    ("costs $5 and $10", "<p>costs $5 and $10</p>"),
    ("$\\frac{1$", '<p><code class="math-error" title="not valid LaTeX">\\frac{1</code></p>'),
]


def test_supported_markdown_still_renders(tmp_path):
    got = run_node(tmp_path, f"out = {json.dumps([t for t, _ in SUPPORTED])}.map((t) => renderMarkdown(t));")
    for (text, want), html in zip(SUPPORTED, got):
        assert html == want, text
    inline, display = run_node(tmp_path, "out = [renderMarkdown('so $x^2$ here'), renderMarkdown('$$\\nx\\n$$')];")
    assert inline.startswith('<p>so <span class="katex"><math') and '<annotation encoding="application/x-tex">x^2' in inline
    assert display.startswith('<div class="math-block" data-testid="math-block">') and 'display="block"' in display
    assert "style=" not in inline + display  # (the page's CSP allows no inline style)


# ------------------------------------------------------------------------------ Chromium, slow

# A worker that renders one input (uncapped), so that a renderer that freezes can be stopped; the
# page's CSP only lets same-origin scripts run, so the test serves it on the page's origin (page.route).
WORKER_PATH = "/test-only/render-worker.js"
WORKER_JS = MAKE_INPUT + """
import { renderMarkdown } from "/static/markdown.js";
onmessage = (e) => {
  const text = makeInput(e.data.spec, e.data.size);
  const t = performance.now();
  try { postMessage({ len: renderMarkdown(text, Infinity).length, ms: performance.now() - t }); }
  catch (err) { postMessage({ error: String(err) }); }
};
"""
RENDER_IN_WORKER = """async ({ spec, size, wait_ms, worker }) => {
  const w = new Worker(worker, { type: "module" });
  try {
    return await new Promise((resolve) => {
      w.onmessage = (e) => resolve(e.data);
      w.onerror = (e) => resolve({ error: `worker error: ${e.message}` });
      setTimeout(() => resolve({ error: `still rendering after ${wait_ms} ms` }), wait_ms);
      w.postMessage({ spec, size });
    });
  } finally { w.terminate(); }
}"""


@pytest.mark.slow
def test_web_renderer_is_linear_in_chromium(tiny_server, chromium_browser):
    """Finding 5 in the browser's own engine: each pathological 1 MB input renders (uncapped)
    within LIMIT_S; a freezing renderer is stopped after 3 * LIMIT_S."""
    ctx, page, errors = open_page(chromium_browser, tiny_server.url)
    page.route(tiny_server.url + WORKER_PATH,
               lambda route: route.fulfill(body=WORKER_JS, content_type="text/javascript"))
    try:
        results = {name: page.evaluate(RENDER_IN_WORKER, {"spec": spec, "size": MB, "wait_ms": 3000 * LIMIT_S,
                                                          "worker": WORKER_PATH})
                   for name, spec in PATHOLOGICAL.items()}
        slow = {n: r for n, r in results.items() if "error" in r or r["ms"] > 1000 * LIMIT_S}
        assert not slow, slow
        assert not errors, errors
    finally:
        ctx.close()


def store_answer(url: str, answer: str) -> str:
    """A stored conversation: a user message and `answer` as the assistant's reply to it."""
    cid = httpx.post(f"{url}/api/conversations", json={"title": "hostile markdown"}, timeout=30).json()["id"]
    u = httpx.post(f"{url}/api/conversations/{cid}/messages", json={"role": "user", "content": "Hi"}, timeout=30)
    u.raise_for_status()
    a = httpx.post(f"{url}/api/conversations/{cid}/messages",
                   json={"role": "assistant", "content": answer, "parent_id": u.json()["id"]}, timeout=60)
    a.raise_for_status()
    return cid


@pytest.mark.slow
@pytest.mark.parametrize("name,answer,shown", [
    ("deep-quote", ">" * 10_000 + " deep-end", "deep-end"),
    ("link-openers-1mb", "[a](" * 249_000 + " link-end", "link-end"),
    ("heading-spaces", "# a" + " " * 20_000 + "heading-end", "heading-end"),
    ("code-blocks-1mb", "```\n```\n" * 124_000 + "blocks-end", "blocks-end"),  # much markup per character
    # spaces around the line breaks of a long paragraph made Chromium's layout quadratic
    ("trailing-space-lines", "x \n" * 300_000 + "lines-end", "lines-end"),
])
def test_web_conversation_with_hostile_answer_opens(tiny_server, chromium_browser, name, answer, shown):
    """Finding 5 end to end: a stored conversation holding the answer opens and shows it, with no
    page error (the old renderer threw RangeError on the deep quote, and froze the tab for minutes
    to hours on the others: the page wait below then times out)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    cid = store_answer(tiny_server.url, answer)
    ctx = chromium_browser.new_context()
    ctx.set_default_timeout(int(1000 * OPEN_S))
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{tiny_server.url}/#/c/{cid}")
        try:
            page.wait_for_selector("body[data-ready='1']")
            body = page.locator("#messages [data-testid=message][data-role=assistant] .msg-body")
            body.wait_for()
        except PlaywrightTimeout:
            pytest.fail(f"the conversation did not open within {OPEN_S} s; page errors: {errors}")
        assert not errors, errors
        assert shown in body.inner_text()
        assert Tags(body.inner_html()).deepest.get("blockquote", 0) <= 16
    finally:
        ctx.close()
