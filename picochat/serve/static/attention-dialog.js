// The "Attention" button of an answer: a dialog with the viewer (attention.js) for that stored message.
// The server rebuilds what the model read and wrote and returns its maps (GET /api/messages/{id}/attention);
// the page asks for one layer at a time (a big model's maps of every layer would be hundreds of MB) and
// the viewer fetches another when that layer is picked. A conversation's pictures are drawn with the
// attention over them, each fetched as pictures.js fetches it (with the page's API key; kept once fetched).
import { $, el } from "./dom.js";
import { api } from "./api.js";
import { mountAttention } from "./attention.js";
import { pictureData } from "./pictures.js";

let viewer = null;
let ticket = 0; // a newer click wins over an answer still on its way

function close() {
  ticket += 1;
  if (viewer) viewer.destroy();
  viewer = null;
}

export function wireAttention() {
  const dialog = $("#attention-dialog");
  $("#attention-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", close);
}

export async function showAttention(msg) {
  const dialog = $("#attention-dialog");
  const body = $("#attention-body");
  close();
  const mine = ticket;
  body.replaceChildren(el("p", { class: "attn-loading", "data-testid": "attention-loading",
    text: "Reading the conversation and the answer again, with the attention maps on\u2026" }));
  if (!dialog.open) dialog.showModal();
  const url = (layer) => `/api/messages/${encodeURIComponent(msg.id)}/attention?layer=${layer}`;
  try {
    const view = await api(url(0));
    if (mine !== ticket) return;
    viewer = mountAttention(body, view, { loadLayer: (layer) => api(url(layer)),
      pictureSrc: (p) => pictureData({ id: p.image_id, url: p.url }) });
  } catch (e) {
    if (mine !== ticket) return;
    const why = e && e.status ? `${e.message} (HTTP ${e.status})` : (e && e.message) || String(e);
    body.replaceChildren(el("p", { class: "attn-error", "data-testid": "attention-error", role: "alert", text: why }));
  }
}
