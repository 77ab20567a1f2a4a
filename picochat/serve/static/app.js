// The picochat web page: conversations stored by the server (/api), answers streamed from the
// OpenAI-compatible endpoint (/v1/chat/completions, SSE). Plain modules, no framework, no build.
// This module wires the page's controls to the others and starts it.
import { escapeHtml } from "./markdown.js";
import { $, copyText } from "./dom.js";
import { api, showError, clearError } from "./api.js";
import { state, handlers } from "./store.js";
import { SAMPLING, writeSettings, loadLocalSettings, settingsChanged, currentModel, fillModels } from "./settings.js";
import { loadConversations, closeSidebarOnPhone, toggleSidebar, wireRename, wireSearch, wireTransfer } from "./sidebar.js";
import { render } from "./render.js";
import { showAttention, wireAttention } from "./attention-dialog.js";
import { attachmentProblem, clearAttachments, drawAttachments, wirePictures } from "./pictures.js";
import {
  newChat, openConversation, sendMessage, generate, stopGenerating, regenerate, startCompare, chooseBetter, rate,
} from "./chat.js";

Object.assign(handlers, { newChat, openConversation, sendMessage, generate, regenerate, startCompare, chooseBetter, rate,
  showAttention });

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
    const pictures = state.attachments.map((a) => a.dataUrl);
    if ((!text.trim() && !pictures.length) || state.generating) return;
    const problem = attachmentProblem();
    if (problem) { showError(new Error(problem)); return; }
    p.value = "";
    autoGrow();
    clearAttachments();
    const leaf = state.leafId;
    sendMessage(text, leaf, pictures);
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
  wireAttention();
  $("#settings-toggle").addEventListener("click", () => {
    const s = $("#settings");
    s.hidden = !s.hidden;
    $("#settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("#settings-reset").addEventListener("click", () => { writeSettings({}, ""); settingsChanged(); });
  for (const id of [...SAMPLING, "system-prompt"]) $("#" + id).addEventListener("change", settingsChanged);
  wirePictures();
  $("#model-select").addEventListener("change", () => {
    drawAttachments(); // the attach button is there only for a model that sees
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
  // shortcuts (as ChatGPT's): Ctrl/Cmd+Shift+O a new chat, Shift+Esc the message box, Esc stops an answer
  document.addEventListener("keydown", (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && ev.shiftKey && ev.key.toLowerCase() === "o") {
      ev.preventDefault();
      if (!state.generating) newChat();
      $("#prompt").focus();
    } else if (ev.key === "Escape" && ev.shiftKey) {
      ev.preventDefault();
      $("#prompt").focus();
    } else if (ev.key === "Escape" && state.generating) stopGenerating();
  });
  wireSearch();
  wireRename();
  wireTransfer();
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
  drawAttachments();
  await loadConversations();
  const m = location.hash.match(/^#\/c\/(.+)$/);
  if (m) await openConversation(decodeURIComponent(m[1]));
  document.body.dataset.busy = "0";
  document.body.dataset.generated = "0";
  document.body.dataset.ready = "1"; // tests wait for this
}

init();

export { escapeHtml }; // for the console
