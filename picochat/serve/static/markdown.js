// A small Markdown renderer for model answers (untrusted text).
// Every piece of source text is HTML-escaped before any markup is added, so the returned string
// only contains the tags this file writes itself. Links are limited to http(s) and mailto.
//
// Supported: paragraphs, headings (#..######), **bold**, *italic* / _italic_, ~~strike~~,
// `inline code`, fenced code blocks (``` or ~~~, with a copy button; an unclosed fence, as seen
// while streaming, runs to the end), ordered / unordered lists (nested by indentation),
// > blockquotes, horizontal rules, [links](https://...) and bare https:// links.

export function escapeHtml(s) {
  return String(s)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

const SAFE_URL = /^(https?:\/\/|mailto:)[^\s]*$/i;

// Inline markup on one block of raw text.
export function renderInline(raw) {
  const slots = [];
  const keep = (html) => `\u0000${slots.push(html) - 1}\u0000`;
  let s = String(raw).replace(/\u0000/g, "");
  // inline code first: its content is not parsed further
  s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) =>
    keep(`<code>${escapeHtml(code.trim() || code)}</code>`));
  // links [text](url): the url must be safe; the text keeps inline markup
  s = s.replace(/\[([^\]\n]+)\]\(\s*([^)\s]+)(?:\s+"[^"]*")?\s*\)/g, (m, text, url) => {
    if (!SAFE_URL.test(url)) return m;
    return keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">`) + text + keep("</a>");
  });
  // bare links
  // (\u0000 is excluded: a bare url must never swallow the placeholder of a link kept above)
  s = s.replace(/\bhttps?:\/\/[^\s<>"'`)\]\u0000]+[^\s<>"'`)\].,;:!?\u0000]/g, (url) =>
    keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${escapeHtml(url)}</a>`));
  s = escapeHtml(s);
  s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
       .replace(/__(?=\S)([\s\S]*?\S)__(?![A-Za-z0-9])/g, "<strong>$1</strong>")
       .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
       .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
       .replace(/(^|[^_A-Za-z0-9])_(?=[^\s_])([^_]*?[^\s_])_(?![_A-Za-z0-9])/g, "$1<em>$2</em>");
  // restore slots (slots may contain further slots: links wrap text)
  for (let i = 0; i < 3 && s.includes("\u0000"); i++) {
    s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => slots[Number(n)]);
  }
  return s;
}

function codeBlock(lang, lines) {
  const l = escapeHtml(lang || "");
  return `<div class="code-block" data-testid="code-block"><div class="code-head"><span class="code-lang">${l || "code"}</span>` +
    `<button type="button" class="code-copy" data-testid="copy-code">Copy</button></div>` +
    `<pre><code${l ? ` class="language-${l}"` : ""}>${escapeHtml(lines.join("\n"))}</code></pre></div>`;
}

const FENCE = /^\s{0,3}(```+|~~~+)\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const HR = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || HR.test(line) || LIST_ITEM.test(line) || QUOTE.test(line);
}

// Lists: items with their indentation; a deeper item opens a nested list.
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
    if (!top || it.indent > top.indent) {
      const start = tag === "ol" && parseInt(it.marker, 10) !== 1 ? ` start="${parseInt(it.marker, 10)}"` : "";
      html += `<${tag}${start}>`;
      stack.push({ indent: it.indent, tag });
    } else {
      html += "</li>";
    }
    html += `<li>${renderInline(it.text).replace(/\n/g, "<br>")}`;
  }
  while (stack.length) html += `</li></${stack.pop().tag}>`;
  return html;
}

export function renderMarkdown(src) {
  const lines = String(src ?? "").replace(/\r\n?/g, "\n").split("\n");
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
    if ((m = line.match(HEADING))) {
      const n = m[1].length;
      out.push(`<h${n}>${renderInline(m[2])}</h${n}>`);
      i++;
      continue;
    }
    if (HR.test(line)) { out.push("<hr>"); i++; continue; }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
      out.push(`<blockquote>${renderMarkdown(body.join("\n"))}</blockquote>`);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const items = [];
      while (i < lines.length) {
        const l = lines[i];
        if ((m = l.match(LIST_ITEM))) {
          items.push({ indent: m[1].replace(/\t/g, "    ").length, marker: m[2], text: m[3] });
          i++;
        } else if (l.trim() && items.length && /^\s+/.test(l) && !FENCE.test(l)) {
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
    out.push(`<p>${para.map(renderInline).join("<br>")}</p>`);
  }
  return out.join("\n");
}
