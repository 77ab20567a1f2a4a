// A small Markdown renderer for model answers (untrusted text).
// Every piece of source text is HTML-escaped before any markup is added, so the returned string
// only contains the tags this file writes itself. Links are limited to http(s) and mailto.
//
// Supported: paragraphs, headings (#..######), **bold**, *italic* / _italic_, ~~strike~~,
// `inline code`, fenced code blocks (``` or ~~~, with a copy button, syntax-highlighted by the
// vendored highlight.js when the language is named; an unclosed fence, as seen while streaming,
// runs to the end), ordered / unordered lists (nested by indentation), > blockquotes, horizontal
// rules, [links](https://...) and bare https:// links, and LaTeX math rendered by the vendored
// KaTeX to MathML: $inline$ and \(inline\), $$display$$ and \[display\] (also as lines of their own).
// A $ opens math only before a non-space and closes only after one and before no digit, so
// "$5 and $10" stays text.
//
// The text is untrusted, so rendering must take linear time and bounded stack whatever it is:
// no regex here has two quantifiers that can trade the same characters (or, for *italic*, their
// scan ends at the next delimiter), and pairing (code spans, **bold**, ...) is done with
// forward-only scans instead of lazy regexes that rescan the rest of the text from every
// unmatched opener. Blockquotes and lists nest at most MAX_DEPTH deep.
// As a backstop, only the first MARKDOWN_LIMIT characters are Markdown; the rest is plain text.

import hljs from "./vendor/highlight/highlight.min.js";
import katex from "./vendor/katex/katex.mjs";

export const MARKDOWN_LIMIT = 100_000;
const MAX_DEPTH = 16;
const HIGHLIGHT_LIMIT = 20_000; // characters of one code block highlighted (the rest of a longer one: plain)
const MATH_LIMIT = 2_000;       // characters of one formula

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const SAFE_URL = /^(https?:\/\/|mailto:)[^\s]*$/i;

// Code spans (CommonMark): a run of N backticks is closed by the next run of exactly N; a run
// with no such partner is literal text. Run indices are kept per length, each with a cursor
// that only moves forward, so pairing is linear in the number of runs.
function codeSpans(s, keep) {
  const starts = [], lens = [];
  for (let p = s.indexOf("`"); p !== -1; p = s.indexOf("`", p)) {
    let q = p + 1;
    while (s.charCodeAt(q) === 96) q++; // `
    starts.push(p);
    lens.push(q - p);
    p = q;
  }
  const byLen = new Map(); // length -> {at: [run indices], next: cursor into at}
  lens.forEach((len, i) => {
    if (!byLen.has(len)) byLen.set(len, { at: [], next: 0 });
    byLen.get(len).at.push(i);
  });
  let out = "", pos = 0;
  for (let i = 0; i < starts.length; i++) {
    const same = byLen.get(lens[i]);
    while (same.next < same.at.length && same.at[same.next] <= i) same.next++;
    if (same.next === same.at.length) continue; // no closing run: literal backticks
    const j = same.at[same.next];
    const code = s.slice(starts[i] + lens[i], starts[j]);
    out += s.slice(pos, starts[i]) + keep(`<code>${escapeHtml(code.trim() || code)}</code>`);
    pos = starts[j] + lens[j];
    i = j; // the runs in between are code
  }
  return out + s.slice(pos);
}

// Wraps open...close pairs in <tag>, like the regex /D(?=\S)([\s\S]*?\S)D/g (`close` matches one
// non-space character then the delimiter) but linear: the closer of an opener is the first
// `close` match after it, so once an opener finds none no later opener can and the scan stops
// (the lazy regex would rescan to the end of the text from every later opener).
function wrapPairs(s, open, close, tag) {
  let out = "", pos = 0;
  open.lastIndex = 0;
  for (let o; (o = open.exec(s));) {
    close.lastIndex = o.index + o[0].length;
    const c = close.exec(s);
    if (!c) break;
    out += s.slice(pos, o.index) + `<${tag}>` + s.slice(o.index + o[0].length, c.index + 1) + `</${tag}>`;
    pos = open.lastIndex = c.index + c[0].length;
  }
  return out + s.slice(pos);
}

// [text](url "title"). The text stops at the next [ or ], the url at the next "](" (or a space,
// ")", a backtick, a slot), so the scans of successive candidates never overlap: linear.
// A url holding a code span (a slot) or a backtick is not a link: an href never contains markup.
const LINK = /\[([^[\]\n]+)\]\(\s*((?:[^\s)\]`\u0000]|\](?!\())+)(?:\s+"[^"\n]*")?\s*\)/g;
// bare links; \u0000 is excluded: a bare url must never swallow the placeholder of a link kept above
const BARE_LINK = /\bhttps?:\/\/[^\s<>"'`)\]\u0000]+[^\s<>"'`)\].,;:!?\u0000]/g;

// TeX -> MathML (no inline styles: the page's CSP allows none); a formula KaTeX cannot read stays source
function mathHtml(tex, display) {
  try {
    return katex.renderToString(tex, { output: "mathml", displayMode: display, throwOnError: true, trust: false,
      strict: "ignore", maxSize: 50, maxExpand: 1000 });
  } catch {
    return `<code class="math-error" title="not valid LaTeX">${escapeHtml(tex)}</code>`;
  }
}

// \(..\), \[..\], $$..$$ and $..$ into slots. Each opener's scan ends at the first possible closer
// (a formula never holds its own delimiter), so every character is read a bounded number of times.
function mathSpans(s, keep) {
  let out = "", pos = 0, i = 0;
  const none = new Set(); // closers known to be absent from here on: their openers are text, unscanned
  while (i < s.length) {
    const c = s[i];
    let open = null, close = null, display = false;
    if (c === "\\" && (s[i + 1] === "(" || s[i + 1] === "[")) {
      open = 2; display = s[i + 1] === "["; close = display ? "\\]" : "\\)";
    } else if (c === "$") {
      if (s[i + 1] === "$") { open = 2; close = "$$"; display = true; }
      else if (s[i + 1] && !/\s/.test(s[i + 1])) { open = 1; close = "$"; }
    }
    if (open === null || none.has(close)) { i += open || 1; continue; }
    let j = s.indexOf(close, i + open);
    if (j === -1) none.add(close);
    // a $ closes after a non-space, and not before a digit (so "$5 and $10" is text)
    if (close === "$" && j !== -1 && (/\s/.test(s[j - 1]) || /\d/.test(s[j + 1] || ""))) j = -1;
    const tex = j === -1 ? "" : s.slice(i + open, j);
    if (j === -1 || !tex.trim() || tex.length > MATH_LIMIT) { i += open; continue; }
    out += s.slice(pos, i) + keep(mathHtml(tex, display));
    pos = i = j + close.length;
  }
  return out + s.slice(pos);
}

// Inline markup on one block of raw text.
export function renderInline(raw) {
  const slots = [];
  const keep = (html) => `\u0000${slots.push(html) - 1}\u0000`;
  let s = String(raw).replace(/\u0000/g, "");
  // (each pass is skipped when its marker is absent: most lines of an answer have none)
  // inline code first: its content is not parsed further
  if (s.includes("`")) s = codeSpans(s, keep);
  // math next: its TeX is not Markdown (slots of code are \u0000-delimited digits: no math inside)
  if (s.includes("$") || s.includes("\\(") || s.includes("\\[")) s = mathSpans(s, keep);
  // links: the url must be safe; the text keeps inline markup (it stays outside the slots)
  if (s.includes("](")) {
    s = s.replace(LINK, (m, text, url) => {
      if (!SAFE_URL.test(url)) return m;
      return keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">`) + text + keep("</a>");
    });
  }
  if (s.includes("://")) {
    s = s.replace(BARE_LINK, (url) =>
      keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${escapeHtml(url)}</a>`));
  }
  s = escapeHtml(s);
  if (s.includes("**")) s = wrapPairs(s, /\*\*(?=\S)/g, /\S\*\*/g, "strong");
  if (s.includes("__")) s = wrapPairs(s, /__(?=\S)/g, /\S__(?![A-Za-z0-9])/g, "strong");
  if (s.includes("~~")) s = wrapPairs(s, /~~(?=\S)/g, /\S~~/g, "del");
  // single * and _: the content cannot hold the delimiter, so each scan ends at the next one
  if (s.includes("*")) s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
  if (s.includes("_")) s = s.replace(/(^|[^_A-Za-z0-9])_(?=[^\s_])([^_]*?[^\s_])_(?![_A-Za-z0-9])/g, "$1<em>$2</em>");
  // restore slots: one pass, no slot holds another (code is escaped; urls exclude \u0000)
  return !slots.length ? s : s.replace(/\u0000(\d+)\u0000/g, (_, n) => slots[Number(n)]);
}

// highlight.js escapes the code itself and adds only <span class="hljs-..."> (no auto-detection: it
// runs every grammar over the text)
function highlighted(code, lang) {
  if (lang && code.length <= HIGHLIGHT_LIMIT && hljs.getLanguage(lang)) {
    try { return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value; } catch { /* plain */ }
  }
  return escapeHtml(code);
}

function codeBlock(lang, lines) {
  const l = escapeHtml(lang || "");
  const code = lines.join("\n");
  return `<div class="code-block" data-testid="code-block"><div class="code-head"><span class="code-lang">${l || "code"}</span>` +
    `<button type="button" class="code-copy" data-testid="copy-code">Copy</button></div>` +
    `<pre><code class="hljs${l ? ` language-${l}` : ""}">${highlighted(code, lang)}</code></pre></div>`;
}

// a formula on lines of its own: $$ or \[ opening a line, up to the line that ends with $$ or \]
const MATH_OPEN = /^\s{0,3}(\$\$|\\\[)/;

// Line patterns. Two quantifiers that could split the same run of characters between them
// (`\s*([\w]*)\s*$`, `(.*?)\s*#*\s*$`, `\s+(.*)$` when `.` stops at a U+2028 in the line) backtrack
// quadratically or worse on a long run of spaces, so optional parts are grouped with a mandatory
// first character, the rest of a line is `[\s\S]*` (it always reaches the end), and headings are
// trimmed in code.
const FENCE = /^\s{0,3}(```+|~~~+)\s*(?:([\w+#.-]+)\s*)?$/;
const HEADING = /^\s{0,3}(#{1,6})\s+/;
const HR = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+([\s\S]*)$/;
const QUOTE = /^\s{0,3}>\s?([\s\S]*)$/;

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || HR.test(line) || LIST_ITEM.test(line) || QUOTE.test(line);
}

// "Title ##" -> "Title": a closing run of # counts when a space precedes it (or it is all there is).
function headingText(text) {
  text = text.trimEnd();
  let k = text.length;
  while (k > 0 && text[k - 1] === "#") k--;
  if (k < text.length && (k === 0 || /\s/.test(text[k - 1]))) text = text.slice(0, k).trimEnd();
  return text;
}

// Lists: items with their indentation; a deeper item opens a nested list (at most MAX_DEPTH).
function renderList(items) {
  let html = "";
  const stack = []; // {indent, tag}
  for (const it of items) {
    const tag = /^\d/.test(it.marker) ? "ol" : "ul";
    while (stack.length && it.indent < stack[stack.length - 1].indent) {
      html += `</li></${stack.pop().tag}>`;
    }
    if (stack.length && it.indent === stack[stack.length - 1].indent && stack[stack.length - 1].tag !== tag) {
      html += `</li></${stack.pop().tag}>`; // 1. after - at the same depth: a new list
    }
    const top = stack[stack.length - 1];
    if (!top || (it.indent > top.indent && stack.length < MAX_DEPTH)) {
      const start = tag === "ol" && parseInt(it.marker, 10) !== 1 ? ` start="${parseInt(it.marker, 10)}"` : "";
      html += `<${tag}${start}>`;
      stack.push({ indent: it.indent, tag });
    } else {
      html += "</li>"; // same depth, or too deep: a sibling
    }
    html += `<li>${renderInline(it.text).replace(/\n/g, "<br>")}`;
  }
  while (stack.length) html += `</li></${stack.pop().tag}>`;
  return html;
}

// Escaped lines, trimmed (see the paragraphs below), a <p> per run of non-blank lines.
function plainText(lines) {
  const out = [];
  let para = [];
  for (const l of [...lines, ""]) {
    if (l.trim()) para.push(escapeHtml(l.trim()));
    else if (para.length) { out.push(`<p>${para.join("<br>")}</p>`); para = []; }
  }
  return out.join("\n");
}

function renderBlocks(lines, depth) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = line.match(FENCE))) {
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) &&
                                   lines[i].trim().replace(new RegExp(`^\\${fence[0]}+`), "") === "")) {
        body.push(lines[i]);
        i++;
      }
      i++; // closing fence (or past the end)
      out.push(codeBlock(m[2], body));
      continue;
    }
    if ((m = line.match(MATH_OPEN))) {
      const closer = m[1] === "$$" ? "$$" : "\\]";
      const first = line.trim().slice(2);
      const body = [];
      let j = i, rest = first;
      while (!rest.trimEnd().endsWith(closer) && j + 1 < lines.length && j - i < 200) { body.push(rest); rest = lines[++j]; }
      if (rest.trimEnd().endsWith(closer)) {
        body.push(rest.trimEnd().slice(0, -2));
        const tex = body.join("\n");
        if (tex.trim() && tex.length <= MATH_LIMIT) {
          out.push(`<div class="math-block" data-testid="math-block">${mathHtml(tex, true)}</div>`);
          i = j + 1;
          continue;
        }
      }
    }
    if ((m = line.match(HEADING))) {
      const n = m[1].length;
      out.push(`<h${n}>${renderInline(headingText(line.slice(m[0].length)))}</h${n}>`);
      i++;
      continue;
    }
    if (HR.test(line)) { out.push("<hr>"); i++; continue; }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
      // bounded nesting: no stack overflow, and each level re-reads the lines at most MAX_DEPTH times
      const inner = depth + 1 < MAX_DEPTH ? renderBlocks(body, depth + 1) : plainText(body);
      out.push(`<blockquote>${inner}</blockquote>`);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const items = [];
      while (i < lines.length) {
        const l = lines[i];
        if ((m = l.match(LIST_ITEM))) {
          items.push({ indent: m[1].replace(/\t/g, "    ").length, marker: m[2], text: m[3].trimEnd() });
          i++;
        } else if (l.trim() && items.length && /^\s/.test(l) && !FENCE.test(l)) {
          items[items.length - 1].text += "\n" + l.trim(); // continuation line
          i++;
        } else if (!l.trim() && i + 1 < lines.length && LIST_ITEM.test(lines[i + 1])) {
          i++; // loose list: blank line between items
        } else {
          break;
        }
      }
      out.push(renderList(items));
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !(para.length && isBlockStart(lines[i]))) {
      para.push(lines[i]);
      i++;
    }
    // trimmed: spaces around a line break are not shown, and they make the browser's layout of a
    // paragraph of many lines quadratic
    out.push(`<p>${para.map((l) => renderInline(l.trim())).join("<br>")}</p>`);
  }
  return out.join("\n");
}

// limit: how many characters are rendered as Markdown (cut at a line end when one is near); the
// rest is shown as plain text in a code block. This also bounds the markup made from a long
// answer, which the browser must lay out (a code block's <pre> lays out fast, whatever its size).
export function renderMarkdown(src, limit = MARKDOWN_LIMIT) {
  let text = String(src ?? "").replace(/\r\n?/g, "\n");
  let tail = null;
  if (text.length > limit) {
    let cut = text.lastIndexOf("\n", limit);
    if (cut < limit * 0.9) cut = limit;
    if (/[\uD800-\uDBFF]/.test(text[cut - 1] || "")) cut--; // keep a surrogate pair whole
    tail = text.slice(cut).replace(/^\n/, "").split("\n");
    text = text.slice(0, cut);
  }
  const html = renderBlocks(text.split("\n"), 0);
  return tail ? html + "\n" + codeBlock("text", tail) : html;
}
