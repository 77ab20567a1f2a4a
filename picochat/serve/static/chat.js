// What the page does with conversations: start / open one, send a message, stream an answer from
// /v1/chat/completions (then find the stored answer in the tree), regenerate, compare and rate.
import { $, toast } from "./dom.js";
import { ApiError, api, readSSE, showError, clearError } from "./api.js";
import { state, setMessages, newestMessageId, pathTo } from "./store.js";
import { readSettings, writeSettings, loadLocalSettings, currentModel, fillModelsSelect } from "./settings.js";
import { loadConversations } from "./sidebar.js";
import { render, drawPending, scrollToBottom } from "./render.js";
import { contentOf, drawAttachments, remember } from "./pictures.js";

// the conversation up to userId, its pictures included (sent again with every request: the server
// keeps no state between requests, and checks they are the stored ones)
async function promptMessages(userId) {
  const msgs = [];
  const sys = $("#system-prompt").value.trim();
  if (sys) msgs.push({ role: "system", content: sys });
  for (const m of pathTo(userId)) {
    if (m.role === "system") continue; // the settings panel owns the system prompt
    msgs.push({ role: m.role, content: await contentOf(m) });
  }
  return msgs;
}

// ---------------------------------------------------------------- opening / new

export function newChat() {
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
  drawAttachments(); // the picture button follows the model
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

export async function openConversation(id) {
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
    drawAttachments(); // the picture button follows the model
    history.replaceState(null, "", `#/c/${encodeURIComponent(id)}`);
    render();
    for (const li of document.querySelectorAll(".conv-item")) li.classList.toggle("active", li.dataset.id === id);
    scrollToBottom(true);
  } catch (e) {
    showError(e);
    if (e.status === 404) { newChat(); loadConversations(); }
  }
}

async function ensureConversation(firstText, pictures) {
  if (state.convId) return state.convId;
  const title = firstText.replace(/\s+/g, " ").trim().slice(0, 60) || (pictures ? "Picture" : "New chat");
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

// pictures: data: URLs that go with the message, before its text (how the model was trained to read them)
export async function sendMessage(text, parentId, pictures = []) {
  if (state.generating) return false;
  text = text.trim();
  if (!text && !pictures.length) return false;
  clearError();
  state.compare = null;
  setBusy(1);
  try {
    const isNew = !state.convId;
    const convId = await ensureConversation(text, pictures.length);
    const content = !pictures.length ? text : [
      ...pictures.map((url) => ({ type: "image_url", image_url: { url } })), ...(text ? [{ type: "text", text }] : [])];
    const msg = await api(`/api/conversations/${encodeURIComponent(convId)}/messages`, {
      method: "POST", body: { role: "user", content, parent_id: parentId ?? null },
    });
    remember(msg, pictures);
    state.byId.set(msg.id, msg);
    setMessages([...state.byId.values()]);
    state.leafId = msg.id;
    render();
    if (isNew) loadConversations();
    await generate(msg.id);
    return true;
  } catch (e) {
    showError(e);
    return false;
  } finally {
    setBusy(-1);
  }
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
export async function generate(userId, opts = {}) {
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
      model: currentModel(), messages: await promptMessages(userId), stream: true, ...readSettings(),
      metadata: { conversation_id: String(convId), parent_id: String(userId) }, // OpenAI metadata: strings
      truncate_history: true, // a long chat drops its oldest turns rather than fail (picochat extension)
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
    const dropped = Number(res.headers.get("X-Picochat-Dropped-Messages") || 0);
    if (dropped > 0) toast(`The conversation is longer than the model's context: its ${dropped} oldest messages were left out of this answer.`);
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

export function stopGenerating() { if (state.generating) state.generating.controller.abort(); }

export function regenerate(assistantMsg) {
  if (state.generating || assistantMsg.parent_id == null) return;
  state.compare = null;
  state.leafId = assistantMsg.parent_id;
  generate(assistantMsg.parent_id);
}

export function startCompare(assistantMsg) {
  if (state.generating || assistantMsg.parent_id == null) return;
  state.compare = { userId: assistantMsg.parent_id, aId: assistantMsg.id, bId: null };
  state.leafId = assistantMsg.parent_id;
  generate(assistantMsg.parent_id, { compare: true }).then((id) => {
    if (id === null && state.compare) { state.compare = null; state.leafId = assistantMsg.id; render(); }
  });
}

export async function chooseBetter(chosenId, rejectedId) {
  try {
    await api("/api/rankings", { method: "POST", body: { chosen_id: chosenId, rejected_id: rejectedId } });
    state.compare = null;
    state.leafId = chosenId;
    render();
    toast("Thanks: preference saved");
  } catch (e) { showError(e); }
}

export async function rate(msg, value) {
  const rating = msg.rating === value ? 0 : value;
  try {
    await api(`/api/messages/${msg.id}/rating`, { method: "POST", body: { rating } });
    msg.rating = rating;
    render();
  } catch (e) { showError(e); }
}
