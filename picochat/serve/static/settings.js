// The model picker and the sampling settings: read from and written to the settings panel, kept
// in localStorage for new chats and PATCHed onto the open conversation.
import { $, el } from "./dom.js";
import { api, showError } from "./api.js";
import { state } from "./store.js";

const SETTINGS_STORAGE = "picochat.settings";
export const SAMPLING = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"];
const INTS = new Set(["top_k", "max_tokens", "seed"]);

function defaults() { return (state.config && state.config.defaults) || {}; }

export function readSettings() {
  const out = {};
  for (const k of SAMPLING) {
    const v = $("#" + k).value.trim();
    if (v === "") continue;
    const n = INTS.has(k) ? parseInt(v, 10) : parseFloat(v);
    if (!Number.isNaN(n)) out[k] = n;
  }
  return out;
}

export function writeSettings(settings = {}, systemPrompt) {
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
export function loadLocalSettings() {
  try { return JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "null"); } catch { return null; }
}

let patchTimer = null;
export function settingsChanged() {
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

export function currentModel() { return $("#model-select").value || (state.config && state.config.default_model) || undefined; }

export function fillModels(models, selected) {
  const sel = $("#model-select");
  sel.replaceChildren(...models.map((m) => el("option", { value: m.id, text: m.id })));
  if (selected && models.some((m) => m.id === selected)) sel.value = selected;
}

export function fillModelsSelect(model) {
  const sel = $("#model-select");
  if ([...sel.options].some((o) => o.value === model)) sel.value = model;
}
