// The picochat web page: conversations stored by the server (/api), answers streamed from the
// OpenAI-compatible endpoint (/v1/chat/completions, SSE). Plain modules, no framework, no build.
import { renderMarkdown, escapeHtml } from "./markdown.js";

const KEY_STORAGE = "picochat.apiKey";
const SETTINGS_STORAGE = "picochat.settings";
const SAMPLING = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty"];
const INTS = new Set(["top_k", "max_tokens"]);

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

// Icons: constant SVG markup (never model text), drawn with currentColor; no icon font, no emoji
// font needed.
const ICONS = {
  copy: '<rect x="9" y="9" width="12" height="12" rx="2"/><path d="M5 15H4a2 2 0 0 1-2-2V4a2 2 0 0 1 2-2h9a2 2 0 0 1 2 2v1"/>',
  up: '<path d="M7 10v11"/><path d="M15 5.9 14 10h5.8a2 2 0 0 1 1.9 2.6l-2.3 7A2 2 0 0 1 17.5 21H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h2.8a2 2 0 0 0 1.8-1.1L12 2a3.1 3.1 0 0 1 3 3.9z"/>',
  down: '<path d="M17 14V3"/><path d="M9 18.1 10 14H4.2a2 2 0 0 1-1.9-2.6l2.3-7A2 2 0 0 1 6.5 3H20a2 2 0 0 1 2 2v7a2 2 0 0 1-2 2h-2.8a2 2 0 0 0-1.8 1.1L12 22a3.1 3.1 0 0 1-3-3.9z"/>',
  redo: '<path d="M21 12a9 9 0 1 1-2.64-6.36L21 8"/><path d="M21 3v5h-5"/>',
  compare: '<rect x="3" y="4" width="7.5" height="16" rx="1.5"/><rect x="13.5" y="4" width="7.5" height="16" rx="1.5"/>',
  edit: '<path d="M12 20h9"/><path d="M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4z"/>',
  trash: '<path d="M3 6h18"/><path d="M19 6l-1 14a2 2 0 0 1-2 2H8a2 2 0 0 1-2-2L5 6"/><path d="M8 6V4a2 2 0 0 1 2-2h4a2 2 0 0 1 2 2v2"/>',
  left: '<path d="m15 18-6-6 6-6"/>',
  right: '<path d="m9 18 6-6-6-6"/>',
  check: '<path d="M20 6 9 17l-5-5"/>',
};
function icon(name) {
  const t = document.createElement("template");
  t.innerHTML = `<svg class="icon" viewBox="0 0 24 24" width="16" height="16" fill="none" stroke="currentColor" ` +
    `stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">${ICONS[name]}</svg>`;
  return t.content.firstChild;
}

const state = {
  config: null,
  models: [],
  convId: null,
  conv: null,
  byId: new Map(),
  children: new Map(), // parent id (or "root") -> messages, oldest first
  leafId: null,
  generating: null, // {controller, userId, text, node}
  compare: null, // {userId, aId, bId}
  editingId: null,
};

// ---------------------------------------------------------------- errors and the API key

class ApiError extends Error {
  constructor(message, status = 0, type = "", param = null) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
  }
}

async function errorFrom(res) {
  let message = `${res.status} ${res.statusText}`;
  let type = "";
  let param = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message || message;
      type = body.error.type || "";
      param = body.error.param ?? null;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch { /* not JSON */ }
  return new ApiError(message, res.status, type, param);
}

function showError(err) {
  if (!err || err.name === "AbortError") return;
  console.error(err);
  const msg = err instanceof ApiError && err.status ? `${err.message} (HTTP ${err.status})` : (err.message || String(err));
  $("#error-text").textContent = msg;
  $("#error").hidden = false;
}
function clearError() { $("#error").hidden = true; $("#error-text").textContent = ""; }

let toastTimer = null;
function toast(text) {
  let t = $("#toast");
  if (!t) { t = el("div", { id: "toast", class: "toast", "data-testid": "toast", role: "status" }); document.body.append(t); }
  t.textContent = text;
  t.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.remove("show"), 2200);
}

let keyPrompt = null;
function askApiKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("#api-key-dialog");
  const input = $("#api-key-input");
  input.value = "";
  $("#api-key-dialog p").textContent = reason ||
    "This server was started with --api-key. The key stays in this browser (localStorage).";
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      keyPrompt = null;
      const key = input.value.trim();
      if (dialog.returnValue === "save" && key) {
        localStorage.setItem(KEY_STORAGE, key);
        resolve(true);
      } else {
        resolve(false);
      }
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

// fetch with JSON, the bearer key, OpenAI-shaped errors; a 401 asks for the key and retries.
async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
    if (res.status === 401 && attempt < 3) {
      const err = await errorFrom(res);
      const ok = await askApiKey(key ? `The key was refused (${err.message}). Enter the server's API key.`
                                     : "This server needs an API key. It stays in this browser (localStorage).");
      if (ok) continue;
      throw err;
    }
    if (!res.ok) throw await errorFrom(res);
    return raw ? res : res.json();
  }
}

// ---------------------------------------------------------------- settings and models

function defaults() { return (state.config && state.config.defaults) || {}; }

function readSettings() {
  const out = {};
  for (const k of SAMPLING) {
    const v = $("#" + k).value.trim();
    if (v === "") continue;
    const n = INTS.has(k) ? parseInt(v, 10) : parseFloat(v);
    if (!Number.isNaN(n)) out[k] = n;
  }
  return out;
}

function writeSettings(settings = {}, systemPrompt) {
  const d = defaults();
  for (const k of SAMPLING) {
    const v = settings[k] ?? d[k];
    $("#" + k).value = v === undefined || v === null ? "" : String(v);
  }
  if (systemPrompt !== undefined) $("#system-prompt").value = systemPrompt || "";
}

function saveLocalSettings() {
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify({ settings: readSettings(), system_prompt: $("#system-prompt").value }));
}
function loadLocalSettings() {
  try { return JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "null"); } catch { return null; }
}

let patchTimer = null;
function settingsChanged() {
  saveLocalSettings();
  if (!state.convId) return;
  clearTimeout(patchTimer);
  const id = state.convId;
  patchTimer = setTimeout(() => {
    api(`/api/conversations/${encodeURIComponent(id)}`, {
      method: "PATCH", body: { system_prompt: $("#system-prompt").value, settings: readSettings() },
    }).catch(showError);
  }, 400);
}

function currentModel() { return $("#model-select").value || (state.config && state.config.default_model) || undefined; }

function fillModels(models, selected) {
  const sel = $("#model-select");
  sel.replaceChildren(...models.map((m) => el("option", { value: m.id, text: m.id })));
  if (selected && models.some((m) => m.id === selected)) sel.value = selected;
}

// ---------------------------------------------------------------- the conversation tree

function setMessages(messages) {
  state.byId = new Map();
  state.children = new Map();
  const sorted = [...messages].sort((a, b) => a.id - b.id);
  for (const m of sorted) {
    state.byId.set(m.id, m);
    const key = m.parent_id ?? "root";
    if (!state.children.has(key)) state.children.set(key, []);
    state.children.get(key).push(m);
  }
}

function siblingsOf(m) { return state.children.get(m.parent_id ?? "root") || [m]; }

// the newest leaf under a message (follow the newest child)
function newestLeafUnder(id) {
  let cur = state.byId.get(id);
  for (;;) {
    const kids = state.children.get(cur.id);
    if (!kids || !kids.length) return cur.id;
    cur = kids[kids.length - 1];
  }
}

function newestMessageId() {
  let best = null;
  for (const m of state.byId.values()) if (best === null || m.id > best) best = m.id;
  return best;
}

function pathTo(id) {
  const path = [];
  let cur = id == null ? null : state.byId.get(id);
  while (cur) {
    path.push(cur);
    cur = cur.parent_id == null ? null : state.byId.get(cur.parent_id);
  }
  return path.reverse();
}

function promptMessages(userId) {
  const msgs = [];
  const sys = $("#system-prompt").value.trim();
  if (sys) msgs.push({ role: "system", content: sys });
  for (const m of pathTo(userId)) {
    if (m.role === "system") continue; // the settings panel owns the system prompt
    msgs.push({ role: m.role, content: m.content });
  }
  return msgs;
}

// ---------------------------------------------------------------- sidebar

async function loadConversations() {
  const list = $("#conversation-list");
  let convs;
  try { convs = await api("/api/conversations"); } catch (e) { showError(e); return; }
  list.replaceChildren(...convs.map((c) => {
    const del = el("button", {
      type: "button", class: "conv-delete", "data-testid": "delete-conversation", "aria-label": "Delete conversation",
      title: "Delete",
    }, icon("trash"));
    del.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (del.dataset.confirm !== "1") { // two clicks: the first one asks
        del.dataset.confirm = "1";
        del.textContent = "Delete?";
        setTimeout(() => { if (del.isConnected) { del.dataset.confirm = ""; del.replaceChildren(icon("trash")); } }, 3000);
        return;
      }
      deleteConversation(c.id);
    });
    const open = el("button", { type: "button", class: "conv-open", "data-testid": "open-conversation", title: c.title || "" },
      el("span", { class: "conv-name", text: c.title || "Untitled" }),
      el("span", { class: "conv-meta", text: `${c.message_count ?? ""} msg · ${c.model || ""}${c.source && c.source !== "web" ? " · " + c.source : ""}` }));
    open.addEventListener("click", () => { openConversation(c.id); closeSidebarOnPhone(); });
    return el("li", {
      class: "conv-item" + (c.id === state.convId ? " active" : ""), "data-testid": "conversation-item", "data-id": c.id,
    }, open, del);
  }));
}

async function deleteConversation(id) {
  try {
    await api(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (id === state.convId) newChat();
    await loadConversations();
  } catch (e) { showError(e); }
}

function isPhone() { return window.matchMedia("(max-width: 760px)").matches; }
function closeSidebarOnPhone() { if (isPhone()) toggleSidebar(false); }
function toggleSidebar(force) {
  const app = $("#app");
  if (isPhone()) {
    const open = force ?? !app.classList.contains("sidebar-open");
    app.classList.toggle("sidebar-open", open);
    $("#scrim").hidden = !open;
  } else {
    const collapsed = force === undefined ? !app.classList.contains("sidebar-collapsed") : !force;
    app.classList.toggle("sidebar-collapsed", collapsed);
  }
}

// ---------------------------------------------------------------- opening / new

function newChat() {
  abandonGeneration();
  state.convId = null;
  state.conv = null;
  state.compare = null;
  state.editingId = null;
  setMessages([]);
  state.leafId = null;
  const local = loadLocalSettings();
  writeSettings(local?.settings || {}, local?.system_prompt ?? "");
  if (state.config) $("#model-select").value = state.config.default_model || $("#model-select").value;
  history.replaceState(null, "", location.pathname);
  render();
  for (const li of document.querySelectorAll(".conv-item.active")) li.classList.remove("active");
  $("#prompt").focus();
}

async function fetchConversation(id) {
  const conv = await api(`/api/conversations/${encodeURIComponent(id)}`);
  state.conv = conv;
  setMessages(conv.messages || []);
  return conv;
}

async function openConversation(id) {
  abandonGeneration();
  clearError();
  try {
    const conv = await fetchConversation(id);
    state.convId = id;
    state.compare = null;
    state.editingId = null;
    state.leafId = newestMessageId();
    writeSettings(conv.settings || {}, conv.system_prompt ?? "");
    if (conv.model) fillModelsSelect(conv.model);
    history.replaceState(null, "", `#/c/${encodeURIComponent(id)}`);
    render();
    for (const li of document.querySelectorAll(".conv-item")) li.classList.toggle("active", li.dataset.id === id);
    scrollToBottom(true);
  } catch (e) {
    showError(e);
    if (e.status === 404) { newChat(); loadConversations(); }
  }
}

function fillModelsSelect(model) {
  const sel = $("#model-select");
  if ([...sel.options].some((o) => o.value === model)) sel.value = model;
}

async function ensureConversation(firstText) {
  if (state.convId) return state.convId;
  const title = firstText.replace(/\s+/g, " ").trim().slice(0, 60) || "New chat";
  const conv = await api("/api/conversations", {
    method: "POST",
    body: { model: currentModel(), title, system_prompt: $("#system-prompt").value, settings: readSettings() },
  });
  state.convId = conv.id;
  state.conv = conv;
  setMessages([]);
  history.replaceState(null, "", `#/c/${encodeURIComponent(conv.id)}`);
  return conv.id;
}

// ---------------------------------------------------------------- sending and streaming

async function sendMessage(text, parentId) {
  if (state.generating) return;
  text = text.trim();
  if (!text) return;
  clearError();
  state.compare = null;
  setBusy(1);
  try {
    const isNew = !state.convId;
    const convId = await ensureConversation(text);
    const msg = await api(`/api/conversations/${encodeURIComponent(convId)}/messages`, {
      method: "POST", body: { role: "user", content: text, parent_id: parentId ?? null },
    });
    state.byId.set(msg.id, msg);
    setMessages([...state.byId.values()]);
    state.leafId = msg.id;
    render();
    if (isNew) loadConversations();
    await generate(msg.id);
  } catch (e) {
    showError(e);
  } finally {
    setBusy(-1);
  }
}

// Reads an SSE body; calls onEvent(obj) per data line until [DONE].
async function readSSE(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  const handle = (block) => {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    if (!data) return false;
    if (data.trim() === "[DONE]") return true;
    let obj;
    try { obj = JSON.parse(data); } catch { return false; }
    if (obj.error) throw new ApiError(obj.error.message || "generation failed", 0, obj.error.type);
    onEvent(obj);
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let m;
    while ((m = buf.match(/\r?\n\r?\n/))) {
      const block = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (handle(block)) { reader.cancel().catch(() => {}); return; }
    }
  }
  buf += decoder.decode();
  if (buf.trim()) handle(buf);
}

// body[data-busy] is "1" while a send or a generation is under way; body[data-generated] counts
// finished generations (tests wait on these)
let busy = 0;
let generated = 0;
function setBusy(delta) {
  busy += delta;
  document.body.dataset.busy = busy > 0 ? "1" : "0";
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Streams a new answer to user message `userId`; afterwards reloads the conversation and returns
// the id of the stored answer (or null).
async function generate(userId, opts = {}) {
  setBusy(1);
  try {
    return await generateInner(userId, opts);
  } finally {
    $("#send").disabled = false;
    generated += 1;
    document.body.dataset.generated = String(generated);
    setBusy(-1);
  }
}

async function generateInner(userId, { compare = false } = {}) {
  const convId = state.convId;
  const known = new Set((state.children.get(userId) || []).map((m) => m.id));
  const controller = new AbortController();
  const gen = { controller, userId, text: "", finish: null, compare };
  state.generating = gen;
  setGenerating(true);
  render(); // draws the pending bubble
  let stopped = false;
  try {
    const body = {
      model: currentModel(), messages: promptMessages(userId), stream: true, ...readSettings(),
      metadata: { conversation_id: String(convId), parent_id: String(userId) }, // OpenAI metadata: strings
    };
    let res;
    try {
      res = await api("/v1/chat/completions", { method: "POST", raw: true, signal: controller.signal, body });
    } catch (e) {
      // max_tokens is an upper bound here: when prompt + max_tokens overflow the context, let the
      // server fill the room that is left instead of failing
      if (!(e instanceof ApiError && e.status === 400 && e.param === "max_tokens" && body.max_tokens !== undefined)) throw e;
      delete body.max_tokens;
      res = await api("/v1/chat/completions", { method: "POST", raw: true, signal: controller.signal, body });
    }
    await readSSE(res, (chunk) => {
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) { gen.text += choice.delta.content; drawPending(); }
      if (choice.finish_reason) gen.finish = choice.finish_reason;
    });
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else showError(e);
  } finally {
    gen.done = true;
    drawPending();
    setGenerating(false);
    $("#send").disabled = true; // until the answer's id is known (its children hang under it)
  }
  // the server stores the answer as the stream ends (a stopped one a moment later)
  let newId = null;
  for (let i = 0; i < (stopped ? 20 : 8) && state.convId === convId; i++) {
    try { await fetchConversation(convId); } catch (e) { showError(e); break; }
    const fresh = (state.children.get(userId) || []).filter((m) => m.role === "assistant" && !known.has(m.id));
    if (fresh.length) { newId = fresh[fresh.length - 1].id; break; }
    await sleep(250);
  }
  if (state.generating === gen) state.generating = null;
  if (state.convId !== convId) return null; // the person moved on
  if (newId !== null) {
    if (compare && state.compare) state.compare.bId = newId;
    else state.leafId = newId;
  } else if (!compare) {
    state.leafId = newestMessageId() ?? state.leafId;
  }
  render();
  loadConversations();
  return newId;
}

function setGenerating(on) {
  $("#app").classList.toggle("is-generating", on);
  $("#send").hidden = on;
  $("#stop").hidden = !on;
}

// leaving the conversation: stop the stream (the server keeps what was generated) and forget it
function abandonGeneration() {
  if (!state.generating) return;
  state.generating.controller.abort();
  state.generating = null;
  setGenerating(false);
}

function stopGenerating() { if (state.generating) state.generating.controller.abort(); }

let drawQueued = false;
function drawPending() {
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

function regenerate(assistantMsg) {
  if (state.generating || assistantMsg.parent_id == null) return;
  state.compare = null;
  state.leafId = assistantMsg.parent_id;
  generate(assistantMsg.parent_id);
}

function startCompare(assistantMsg) {
  if (state.generating || assistantMsg.parent_id == null) return;
  state.compare = { userId: assistantMsg.parent_id, aId: assistantMsg.id, bId: null };
  state.leafId = assistantMsg.parent_id;
  generate(assistantMsg.parent_id, { compare: true }).then((id) => {
    if (id === null && state.compare) { state.compare = null; state.leafId = assistantMsg.id; render(); }
  });
}

async function chooseBetter(chosenId, rejectedId) {
  try {
    await api("/api/rankings", { method: "POST", body: { chosen_id: chosenId, rejected_id: rejectedId } });
    state.compare = null;
    state.leafId = chosenId;
    render();
    toast("Thanks: preference saved");
  } catch (e) { showError(e); }
}

async function rate(msg, value) {
  const rating = msg.rating === value ? 0 : value;
  try {
    await api(`/api/messages/${msg.id}/rating`, { method: "POST", body: { rating } });
    msg.rating = rating;
    render();
  } catch (e) { showError(e); }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const ta = el("textarea", { class: "sr-only" });
    ta.value = text;
    document.body.append(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
  if (button && !button.dataset.copied) {
    const old = [...button.childNodes];
    button.dataset.copied = "1";
    button.replaceChildren(icon("check"), " Copied");
    setTimeout(() => { button.replaceChildren(...old); delete button.dataset.copied; }, 1200);
  }
}

// ---------------------------------------------------------------- rendering

function nearBottom() {
  const s = $("#scroller");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}
function scrollToBottom(force) {
  const s = $("#scroller");
  if (force || nearBottom()) s.scrollTop = s.scrollHeight;
}

function iconButton(testid, label, iconName, onclick, extra = {}, text = null) {
  return el("button", { type: "button", class: "act", "data-testid": testid, "aria-label": label, title: label, onclick, ...extra },
    icon(iconName), text ? el("span", { class: "act-text", text }) : null);
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
  if (isUser) body.textContent = m.content;
  else body.innerHTML = renderMarkdown(m.content); // escaped by renderMarkdown
  if (!isUser) node.append(el("div", { class: "avatar", "aria-hidden": "true", text: "\u03C0" }));
  node.append(body);

  if (isUser && state.editingId === m.id) {
    const ta = el("textarea", { class: "edit-input", "data-testid": "edit-input", rows: 3 });
    ta.value = m.content;
    const save = () => { const t = ta.value; state.editingId = null; sendMessage(t, m.parent_id); };
    ta.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); save(); }
      if (ev.key === "Escape") { state.editingId = null; render(); }
    });
    body.replaceChildren(ta, el("div", { class: "edit-actions" },
      el("button", { type: "button", class: "btn", "data-testid": "edit-cancel", text: "Cancel", onclick: () => { state.editingId = null; render(); } }),
      el("button", { type: "button", class: "btn btn-primary", "data-testid": "edit-save", text: "Save & send", onclick: save })));
    setTimeout(() => { ta.focus(); ta.setSelectionRange(ta.value.length, ta.value.length); });
    return node;
  }
  if (!actions) return node;

  const bar = el("div", { class: "msg-actions" });
  const nav = siblingNav(m);
  if (nav) bar.append(nav);
  if (isUser) {
    bar.append(iconButton("edit", "Edit and resend", "edit", () => { if (!state.generating) { state.editingId = m.id; render(); } }, {}, "Edit"));
    const answered = (state.children.get(m.id) || []).some((c) => c.role === "assistant");
    if (!answered && m.id === state.leafId) bar.append(iconButton("retry", "Answer this message", "redo", () => { if (!state.generating) generate(m.id); }, {}, "Answer"));
  } else {
    if (m.finish_reason === "cancelled") bar.append(el("span", { class: "badge", text: "stopped" }));
    else if (m.finish_reason === "length") bar.append(el("span", { class: "badge", text: "max tokens" }));
    bar.append(
      iconButton("copy", "Copy answer", "copy", (ev) => copyText(m.content, ev.currentTarget)),
      iconButton("thumb-up", "Good answer", "up", () => rate(m, 1), { "aria-pressed": String(m.rating === 1), class: "act" + (m.rating === 1 ? " on" : "") }),
      iconButton("thumb-down", "Bad answer", "down", () => rate(m, -1), { "aria-pressed": String(m.rating === -1), class: "act" + (m.rating === -1 ? " on" : "") }),
      iconButton("regenerate", "Regenerate", "redo", () => regenerate(m)),
      iconButton("compare", "Compare with a second answer", "compare", () => startCompare(m), {}, "Compare"));
    if (m.model) bar.append(el("span", { class: "model-tag", text: m.model }));
  }
  node.append(bar);
  return node;
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
          text: "This one is better", onclick: () => chooseBetter(m.id, other.id),
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

function render() {
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
  document.title = state.conv && state.conv.title ? `${state.conv.title} · picochat` : "picochat";
}

// ---------------------------------------------------------------- wiring

function autoGrow() {
  const p = $("#prompt");
  p.style.height = "auto";
  p.style.height = Math.min(p.scrollHeight, 220) + "px";
}

function wire() {
  $("#composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = $("#prompt");
    const text = p.value;
    if (!text.trim() || state.generating) return;
    p.value = "";
    autoGrow();
    const leaf = state.leafId;
    sendMessage(text, leaf);
  });
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  $("#prompt").addEventListener("input", autoGrow);
  $("#stop").addEventListener("click", stopGenerating);
  $("#new-chat").addEventListener("click", () => { newChat(); closeSidebarOnPhone(); });
  $("#sidebar-toggle").addEventListener("click", () => toggleSidebar());
  $("#scrim").addEventListener("click", () => toggleSidebar(false));
  $("#error-close").addEventListener("click", clearError);
  $("#settings-toggle").addEventListener("click", () => {
    const s = $("#settings");
    s.hidden = !s.hidden;
    $("#settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("#settings-reset").addEventListener("click", () => { writeSettings({}, ""); settingsChanged(); });
  for (const id of [...SAMPLING, "system-prompt"]) $("#" + id).addEventListener("change", settingsChanged);
  $("#model-select").addEventListener("change", () => {
    if (!state.convId) return;
    api(`/api/conversations/${encodeURIComponent(state.convId)}`, { method: "PATCH", body: { model: currentModel() } })
      .catch(showError);
  });
  // copy buttons inside rendered code blocks
  document.addEventListener("click", (ev) => {
    const b = ev.target.closest && ev.target.closest(".code-copy");
    if (!b) return;
    const code = b.closest(".code-block").querySelector("code");
    copyText(code.textContent, b);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && state.generating) stopGenerating();
  });
}

async function init() {
  wire();
  try {
    const [config, models] = await Promise.all([api("/api/config"), api("/v1/models")]);
    state.config = config;
    state.models = models.data || [];
    fillModels(state.models.length ? state.models : (config.models || []), config.default_model);
  } catch (e) { showError(e); }
  const local = loadLocalSettings();
  writeSettings(local?.settings || {}, local?.system_prompt ?? "");
  render();
  await loadConversations();
  const m = location.hash.match(/^#\/c\/(.+)$/);
  if (m) await openConversation(decodeURIComponent(m[1]));
  document.body.dataset.busy = "0";
  document.body.dataset.generated = "0";
  document.body.dataset.ready = "1"; // tests wait for this
}

init();

export { escapeHtml }; // for the console
