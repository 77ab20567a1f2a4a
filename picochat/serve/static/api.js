// Talking to the server: fetch with the bearer key (asked for on a 401), OpenAI-shaped errors,
// and reading the SSE stream of /v1/chat/completions.
import { $ } from "./dom.js";

const KEY_STORAGE = "picochat.apiKey";

// ---------------------------------------------------------------- errors and the API key

export class ApiError extends Error {
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

export function showError(err) {
  if (!err || err.name === "AbortError") return;
  console.error(err);
  const msg = err instanceof ApiError && err.status ? `${err.message} (HTTP ${err.status})` : (err.message || String(err));
  $("#error-text").textContent = msg;
  $("#error").hidden = false;
}
export function clearError() { $("#error").hidden = true; $("#error-text").textContent = ""; }

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
export async function api(path, { method = "GET", body, signal, raw = false } = {}) {
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

// Reads an SSE body; calls onEvent(obj) per data line until [DONE].
export async function readSSE(res, onEvent) {
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
