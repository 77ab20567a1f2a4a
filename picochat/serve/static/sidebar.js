// The conversation list in the sidebar, and showing / hiding the sidebar (a drawer on phones).
import { $, el, icon } from "./dom.js";
import { api, showError } from "./api.js";
import { state, handlers } from "./store.js";

// the list (filtered by the search box: conversations whose title or messages hold its text)
export async function loadConversations() {
  const list = $("#conversation-list");
  const q = $("#conversation-search").value.trim();
  let convs;
  try { convs = await api("/api/conversations" + (q ? "?q=" + encodeURIComponent(q) : "")); } catch (e) { showError(e); return; }
  if (q !== $("#conversation-search").value.trim()) return; // typed on meanwhile: a newer search draws the list
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
    open.addEventListener("click", () => { handlers.openConversation(c.id); closeSidebarOnPhone(); });
    return el("li", {
      class: "conv-item" + (c.id === state.convId ? " active" : ""), "data-testid": "conversation-item", "data-id": c.id,
    }, open, del);
  }));
}

async function deleteConversation(id) {
  try {
    await api(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (id === state.convId) handlers.newChat();
    await loadConversations();
  } catch (e) { showError(e); }
}

function isPhone() { return window.matchMedia("(max-width: 760px)").matches; }
export function closeSidebarOnPhone() { if (isPhone()) toggleSidebar(false); }
export function toggleSidebar(force) {
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

let searchTimer = null;
export function wireSearch() {
  $("#conversation-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(loadConversations, 200);
  });
}

// the title in the top bar: the pencil turns it into a box; Enter saves, Escape gives up
export function wireRename() {
  const input = $("#title-input"), title = $("#conversation-title");
  const close = () => { input.hidden = true; title.hidden = false; };
  $("#rename").addEventListener("click", () => {
    if (!state.convId) return;
    input.value = (state.conv && state.conv.title) || "";
    title.hidden = true;
    input.hidden = false;
    input.focus();
    input.select();
  });
  input.addEventListener("keydown", async (ev) => {
    if (ev.key === "Escape") { ev.stopPropagation(); close(); return; }
    if (ev.key !== "Enter" || ev.isComposing) return;
    ev.preventDefault();
    const t = input.value.trim();
    close();
    if (!t || !state.convId || (state.conv && t === state.conv.title)) return;
    try {
      const conv = await api(`/api/conversations/${encodeURIComponent(state.convId)}`, { method: "PATCH", body: { title: t } });
      state.conv = { ...state.conv, title: conv.title };
      title.textContent = conv.title;
      document.title = `${conv.title} · picochat`;
      await loadConversations();
    } catch (e) { showError(e); }
  });
  input.addEventListener("blur", close);
}

// export (one conversation, or all) as a JSON download; import such a file back (new conversations)
async function download(path, name) {
  const res = await api(path, { raw: true });
  const url = URL.createObjectURL(await res.blob());
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function wireTransfer() {
  $("#export").addEventListener("click", () => {
    if (state.convId) download(`/api/conversations/${encodeURIComponent(state.convId)}/export`,
      `${(state.conv && state.conv.title) || "conversation"}.json`).catch(showError);
  });
  $("#export-all").addEventListener("click", () => download("/api/export", "picochat-conversations.json").catch(showError));
  $("#import").addEventListener("click", () => $("#import-file").click());
  $("#import-file").addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    ev.target.value = "";
    if (!file) return;
    try {
      let doc;
      try { doc = JSON.parse(await file.text()); } catch { throw new Error(`${file.name} is not JSON: export a conversation first`); }
      const r = await api("/api/import", { method: "POST", body: doc });
      await loadConversations();
      if (r.imported.length) await handlers.openConversation(r.imported[0].id);
    } catch (e) { showError(e); }
  });
}
