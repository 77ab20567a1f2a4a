// Drawing the page from the state: the branch of messages shown, the answer being streamed, the
// side-by-side compare view, and the title.
import { renderMarkdown } from "./markdown.js";
import { $, el, icon, copyText } from "./dom.js";
import { state, handlers, siblingsOf, newestLeafUnder, pathTo } from "./store.js";
import { showError } from "./api.js";
import { dataUrlsOf, pictureNodes, userBody } from "./pictures.js";
import { tokenNodes, tokensOf, toggleTokens } from "./tokens.js";

function nearBottom() {
  const s = $("#scroller");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}
export function scrollToBottom(force) {
  const s = $("#scroller");
  if (force || nearBottom()) s.scrollTop = s.scrollHeight;
}

function iconButton(testid, label, iconName, onclick, extra = {}, text = null) {
  return el("button", { type: "button", class: "act", "data-testid": testid, "aria-label": label, title: label, onclick, ...extra },
    icon(iconName), text ? el("span", { class: "act-text", text }) : null);
}

let drawQueued = false;
export function drawPending() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    const gen = state.generating;
    if (!gen || !gen.node) return;
    const body = gen.node.querySelector(".msg-body");
    const stick = nearBottom();
    body.innerHTML = renderMarkdown(gen.text) || '<span class="typing"><i></i><i></i><i></i></span>';
    gen.node.classList.toggle("streaming", !gen.done);
    if (stick) scrollToBottom(true);
  });
}

function siblingNav(m) {
  const sibs = siblingsOf(m).filter((s) => s.role === m.role);
  if (sibs.length < 2) return null;
  const i = sibs.findIndex((s) => s.id === m.id);
  const go = (j) => () => { if (!state.generating) { state.compare = null; state.leafId = newestLeafUnder(sibs[j].id); render(); } };
  return el("span", { class: "siblings", "data-testid": "sibling-nav" },
    iconButton("sibling-prev", "Previous version", "left", go(i - 1), { disabled: i === 0, class: "act sibling" }),
    el("span", { class: "sibling-pos", "data-testid": "sibling-pos", text: `${i + 1}/${sibs.length}` }),
    iconButton("sibling-next", "Next version", "right", go(i + 1), { disabled: i === sibs.length - 1, class: "act sibling" }));
}

function messageNode(m, { actions = true } = {}) {
  const isUser = m.role === "user";
  const node = el("div", {
    class: `msg msg-${m.role}`, "data-testid": "message", "data-role": m.role, "data-id": m.id,
    "data-finish": m.finish_reason || null,
  });
  const body = el("div", { class: "msg-body" + (isUser ? "" : " markdown") });
  if (isUser) userBody(body, m); // its text, with its pictures where they sit
  else if (tokensOf(m.id)) body.replaceChildren(el("div", { class: "tokens", "data-testid": "token-view" }, ...tokenNodes(tokensOf(m.id))));
  else body.innerHTML = renderMarkdown(m.content); // escaped by renderMarkdown
  if (!isUser) node.append(el("div", { class: "avatar", "aria-hidden": "true", text: "\u03C0" }));
  node.append(body);

  if (isUser && state.editingId === m.id) {
    const ta = el("textarea", { class: "edit-input", "data-testid": "edit-input", rows: 3 });
    ta.value = m.content;
    // the edited message keeps its pictures (sent again, before the new text)
    const save = async () => {
      const t = ta.value;
      state.editingId = null;
      let pictures = [];
      try { pictures = await dataUrlsOf(m); } catch (e) { showError(e); return; }
      handlers.sendMessage(t, m.parent_id, pictures);
    };
    ta.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); save(); }
      if (ev.key === "Escape") { state.editingId = null; render(); }
    });
    body.replaceChildren(...pictureNodes(m), ta, el("div", { class: "edit-actions" },
      el("button", { type: "button", class: "btn", "data-testid": "edit-cancel", text: "Cancel", onclick: () => { state.editingId = null; render(); } }),
      el("button", { type: "button", class: "btn btn-primary", "data-testid": "edit-save", text: "Save & send", onclick: save })));
    // Only if nothing has taken focus meanwhile: moving the caret after the user (or a test's
    // fill()) has selected the text would turn a replace into an append.
    setTimeout(() => { if (document.activeElement !== ta) { ta.focus(); ta.setSelectionRange(ta.value.length, ta.value.length); } });
    return node;
  }
  if (!actions) return node;

  const bar = el("div", { class: "msg-actions" });
  const nav = siblingNav(m);
  if (nav) bar.append(nav);
  if (isUser) {
    bar.append(iconButton("edit", "Edit and resend", "edit", () => { if (!state.generating) { state.editingId = m.id; render(); } }, {}, "Edit"));
    const answered = (state.children.get(m.id) || []).some((c) => c.role === "assistant");
    if (!answered && m.id === state.leafId) bar.append(iconButton("retry", "Answer this message", "redo", () => { if (!state.generating) handlers.generate(m.id); }, {}, "Answer"));
  } else {
    if (m.finish_reason === "cancelled") bar.append(el("span", { class: "badge", text: "stopped" }));
    else if (m.finish_reason === "length") bar.append(el("span", { class: "badge", text: "max tokens" }));
    bar.append(
      iconButton("copy", "Copy answer", "copy", (ev) => copyText(m.content, ev.currentTarget)),
      iconButton("thumb-up", "Good answer", "up", () => handlers.rate(m, 1), { "aria-pressed": String(m.rating === 1), class: "act" + (m.rating === 1 ? " on" : "") }),
      iconButton("thumb-down", "Bad answer", "down", () => handlers.rate(m, -1), { "aria-pressed": String(m.rating === -1), class: "act" + (m.rating === -1 ? " on" : "") }),
      iconButton("regenerate", "Regenerate", "redo", () => handlers.regenerate(m)),
      iconButton("compare", "Compare with a second answer", "compare", () => handlers.startCompare(m), {}, "Compare"),
      iconButton("attention", "Show what each token attended to", "grid", () => handlers.showAttention(m), {}, "Attention"),
      iconButton("tokens", "Show each token's probability (hover a token for the alternatives)", "tokens",
        () => toggleTokens(m, render), { "aria-pressed": String(!!tokensOf(m.id)) }, "Tokens"));
    if (m.model) bar.append(el("span", { class: "model-tag", text: m.model }));
    const stats = statsText(m);
    if (stats) bar.append(el("span", { class: "msg-stats", "data-testid": "message-stats", text: stats }));
  }
  node.append(bar);
  return node;
}

// "42 tokens · first token 0.31 s · 23.5 tokens/s": what the server measured for this answer
function statsText(m) {
  const parts = [];
  if (typeof m.completion_tokens === "number") parts.push(`${m.completion_tokens} token${m.completion_tokens === 1 ? "" : "s"}`);
  const t = m.settings && m.settings.timing;
  // (settings are JSON anyone may have written, through an import or the store API: numbers only)
  if (t && typeof t.ttft_s === "number") parts.push(`first token ${t.ttft_s.toFixed(2)} s`);
  if (t && typeof t.tokens_per_s === "number") parts.push(`${t.tokens_per_s.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

function pendingNode() {
  const node = el("div", { class: "msg msg-assistant streaming", "data-testid": "streaming-message", "data-role": "assistant" },
    el("div", { class: "avatar", "aria-hidden": "true", text: "\u03C0" }),
    el("div", { class: "msg-body markdown" }));
  return node;
}

function renderCompare() {
  const box = $("#compare");
  const c = state.compare;
  if (!c) { box.hidden = true; box.replaceChildren(); return; }
  box.hidden = false;
  const a = state.byId.get(c.aId);
  const b = c.bId != null ? state.byId.get(c.bId) : null;
  const column = (label, m, other) => {
    const col = el("div", { class: "compare-col", "data-testid": "compare-column", "data-id": m ? m.id : null },
      el("div", { class: "compare-label", text: label }));
    if (m) {
      col.append(messageNode(m, { actions: false }));
      if (other) {
        col.append(el("button", {
          type: "button", class: "btn btn-primary choose", "data-testid": "choose-better", "data-id": m.id,
          text: "This one is better", onclick: () => handlers.chooseBetter(m.id, other.id),
        }));
      }
    } else if (state.generating && state.generating.compare) {
      const p = pendingNode();
      state.generating.node = p;
      col.append(p);
      drawPending();
    }
    return col;
  };
  box.replaceChildren(
    el("div", { class: "compare-head" },
      el("span", { text: "Which answer is better?" }),
      el("button", { type: "button", class: "btn", "data-testid": "compare-cancel", text: "Skip",
        onclick: () => { if (!state.generating) { const keep = c.aId; state.compare = null; state.leafId = keep; render(); } } })),
    el("div", { class: "compare-grid" }, column("Answer A", a, b), column("Answer B", b, a)));
}

export function render() {
  const msgs = $("#messages");
  const path = pathTo(state.leafId);
  const nodes = path.filter((m) => m.role !== "system").map((m) => messageNode(m));
  const gen = state.generating;
  if (gen && !gen.compare && !gen.done) {
    gen.node = pendingNode();
    nodes.push(gen.node);
  }
  msgs.replaceChildren(...nodes);
  if (gen && !gen.compare) drawPending();
  renderCompare();
  $("#empty").hidden = nodes.length > 0 || !!state.compare;
  $("#conversation-title").textContent = (state.conv && state.conv.title) || "New chat";
  $("#rename").hidden = !state.convId;
  $("#export").hidden = !state.convId;
  document.title = state.conv && state.conv.title ? `${state.conv.title} · picochat` : "picochat";
}
