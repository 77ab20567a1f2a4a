"""`write_html(view, path)`: one self-contained HTML page to explore an AttentionView, offline.

The page inlines the web page's own viewer (picochat/serve/static/attention.js, its sibling
attention-images.js and attention.css, read when the page is written: one viewer, not two copies) and the
view's JSON (to_json: weights rounded to 4 decimals; a VLM's picture as a small data: URL). It loads
nothing from anywhere: its Content-Security-Policy allows no network at all (images: data: URLs only), so
it opens the same from a laptop, an email attachment or a machine without internet.

Size: a view is layers x heads x T_q x T_k numbers of about 7 bytes of JSON each, and a browser slows
down past ~100 MB of page. Above WARN_NUMBERS (2 M numbers, ~14 MB) a warning is logged; above
MAX_NUMBERS (16 M, ~110 MB) the page is refused with an error saying what to do: keep only some
layers (`layers=[...]`, the others stay out of the page and it says so) or read a shorter text.
SmolLM2 (30 layers x 9 heads) reaches 2 M numbers at 86 tokens and 16 M at 243.
"""
from __future__ import annotations

import html
import json
import re
import logging
from pathlib import Path
from typing import Optional

from ..errors import PicochatError
from ..fsutil import atomic_write

WARN_NUMBERS = 2_000_000
MAX_NUMBERS = 16_000_000
STATIC = Path(__file__).resolve().parents[1] / "serve" / "static"

log = logging.getLogger("picochat.inspect")

# the page around the viewer; the viewer's own look is attention.css, its colours these variables
PAGE_CSS = """
:root { --bg: #fff; --bg-soft: #f6f7f9; --panel: #fff; --text: #1b1f24; --muted: #667085; --border: #e2e5ea;
  --accent: #4f46e5; --font: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", Arial, sans-serif;
  --mono: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; color-scheme: light dark; }
@media (prefers-color-scheme: dark) { :root { --bg: #16181d; --bg-soft: #1d2027; --panel: #1d2027; --text: #e6e8ec;
  --muted: #98a2b3; --border: #2c313a; --accent: #818cf8; } }
html, body { margin: 0; background: var(--bg); color: var(--text); font: 15px/1.5 var(--font); }
main { max-width: 1400px; margin: 0 auto; padding: 16px 20px 40px; }
.error { color: #d92d20; white-space: pre-wrap; }
"""

# mounts the viewer on the inlined data; any failure is shown in the page, not only in the console
BOOT = """
try {
  const view = JSON.parse(document.getElementById("attention-data").textContent);
  window.attentionViewer = mountAttention(document.getElementById("attention-root"), view);
} catch (e) {
  const p = document.createElement("p");
  p.className = "error";
  p.textContent = "The attention viewer failed: " + (e && e.message ? e.message : e);
  document.getElementById("attention-root").replaceChildren(p);
  throw e;
} finally {
  document.body.dataset.ready = "1";
}
"""

# the viewer's modules, dependencies first, as one inline module: the import lines between them are dropped
# (the names they import are then in the same scope), since an inline page cannot load a sibling file
MODULES = ("attention-images.js", "attention.js")
SIBLING_IMPORT = re.compile(r'^import \{[^}]*\} from "\./[\w.-]+\.js";\n', re.M)

# nothing from the network, not even from the file's own folder: only what is inline
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


def _asset(name: str) -> str:
    text = (STATIC / name).read_text("utf-8")
    lowered = text.lower()
    if "</script" in lowered or "<!--" in lowered or "</style" in lowered:  # would end the inline element early
        raise PicochatError(f"{STATIC / name} contains '</script', '</style' or '<!--' and cannot be inlined")
    return text


def viewer_js() -> str:
    """attention.js and its sibling module, linked into one script for an inline <script type="module">."""
    return "\n".join(SIBLING_IMPORT.sub("", _asset(name)) for name in MODULES)


def count_numbers(view) -> int:
    return sum(g.weights.numel() for g in view.groups.values())


def page_html(view, layers: Optional[list[int]] = None, max_numbers: int = MAX_NUMBERS) -> str:
    """The page as a string (write_html writes it). layers: only these (0-based) layers go in."""
    n_layers = next(iter(view.groups.values())).weights.size(0) if view.groups else 0
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers:
            raise PicochatError(f"layers {layers}: this model has layers 0..{n_layers - 1}")
    kept = n_layers if layers is None else len(layers)
    numbers = count_numbers(view) // max(n_layers, 1) * kept
    if numbers > max_numbers:
        raise PicochatError(
            f"the attention page would hold {numbers:,} numbers (about {numbers * 7 // 2**20} MB; at most "
            f"{max_numbers:,}): keep fewer layers (picochat attention --layers 0,{n_layers - 1}; in Python "
            f"write_html(..., layers=[0, {n_layers - 1}])) or read a shorter text")
    if numbers > WARN_NUMBERS:
        log.warning("the attention page holds %s numbers (about %d MB): a browser may take a while to open it",
                    f"{numbers:,}", numbers * 7 // 2**20)
    data = view.to_json()
    if layers is not None:
        for g in data["groups"].values():
            g["weights"] = [g["weights"][i] for i in layers]
            g["layers"] = len(layers)
        data["layer_ids"], data["n_layers"] = list(layers), n_layers
    # inside <script type="application/json"> only "</script" or "<!--" could end it: no "<" at all then
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = html.escape(view.title or "attention")
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{title} · attention · picochat</title>\n'
            f'<style>{PAGE_CSS}\n{_asset("attention.css")}</style>\n</head>\n<body>\n<main>\n'
            f'<div id="attention-root"></div>\n'
            f'<noscript>This page draws the maps with JavaScript; turn it on to see them.</noscript>\n</main>\n'
            f'<script type="application/json" id="attention-data">{payload}</script>\n'
            f'<script type="module">\n{viewer_js()}\n{BOOT}</script>\n</body>\n</html>\n')


def write_html(view, path, layers: Optional[list[int]] = None, max_numbers: int = MAX_NUMBERS) -> Path:
    """Write the page to path (atomically: a reader never sees half of it) and return the path."""
    path = Path(path)
    atomic_write(path, page_html(view, layers, max_numbers))
    return path
