// Pictures in the conversation: the attach button (only for a model that sees), the thumbnails of the
// pictures waiting to go with the next message, the pictures inside stored user messages, and the
// image_url parts that send them to the model again (regenerate, the next turn, after a reload).
//
// A stored picture is fetched once through api() (so an API key, sent as a header, works: an <img src>
// could not send it) and kept as a data: URL, which both the <img> and the next request use; the
// page's Content-Security-Policy allows data: images and nothing else.
import { $, el } from "./dom.js";
import { api, showError } from "./api.js";
import { state } from "./store.js";
import { currentModel } from "./settings.js";

export const MAX_BYTES = 20 * 1024 * 1024; // the server's limit (data/scenes.py MAX_FILE_BYTES)
const TYPES = ["image/png", "image/jpeg"];

state.attachments = []; // [{name, dataUrl}] for the next message
const stored = new Map(); // stored picture id -> Promise of its data: URL

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error || new Error("the picture could not be read"));
    r.readAsDataURL(blob);
  });
}

export function modelSees(id = currentModel()) {
  const m = (state.models || []).find((x) => x.id === id) || ((state.config && state.config.models) || []).find((x) => x.id === id);
  return !!(m && m.vision);
}

function seeingModels() {
  return (state.models || []).filter((m) => m.vision).map((m) => m.id);
}

// why the next message's pictures cannot be sent to the selected model, or "" when they can
export function attachmentProblem() {
  if (!state.attachments.length || modelSees()) return "";
  const others = seeingModels();
  return `${currentModel()} cannot see pictures: ` +
    (others.length ? `pick a model that can (${others.join(", ")}) or remove the picture.` : "remove the picture.");
}

// ---------------------------------------------------------------- the composer

export async function attachFiles(files) {
  for (const f of files) {
    if (!TYPES.includes(f.type)) {
      showError(new Error(`${f.name} is not a PNG or JPEG picture (it is ${f.type || "of an unknown type"}); attach a .png or .jpg file.`));
      continue;
    }
    if (f.size > MAX_BYTES) {
      showError(new Error(`${f.name} is ${(f.size / 2 ** 20).toFixed(1)} MB; pictures up to 20 MB can be sent: shrink it.`));
      continue;
    }
    try {
      state.attachments.push({ name: f.name, dataUrl: await readAsDataUrl(f) });
    } catch (e) { showError(e); }
  }
  drawAttachments();
}

export function clearAttachments() {
  state.attachments = [];
  drawAttachments();
}

// the attach button shows only for a model that sees; the thumbnails, and a note if they cannot go
export function drawAttachments() {
  const sees = modelSees();
  $("#attach").hidden = !sees;
  const box = $("#attachments");
  const thumbs = state.attachments.map((a, i) => el("div", { class: "thumb", "data-testid": "attachment" },
    el("img", { src: a.dataUrl, alt: a.name, title: a.name }),
    el("button", { type: "button", class: "thumb-remove", "data-testid": "attachment-remove", "aria-label": `Remove ${a.name}`,
      title: "Remove", text: "\u00D7", onclick: () => { state.attachments.splice(i, 1); drawAttachments(); } })));
  const problem = attachmentProblem();
  if (problem) thumbs.push(el("span", { class: "thumb-note", "data-testid": "attachment-note", text: problem }));
  box.replaceChildren(...thumbs);
  box.hidden = thumbs.length === 0;
}

export function wirePictures(onChange) {
  $("#attach").addEventListener("click", () => $("#image-input").click());
  $("#image-input").addEventListener("change", async (ev) => {
    const files = [...ev.target.files];
    ev.target.value = ""; // the same file may be picked again
    await attachFiles(files);
    onChange && onChange();
  });
  // a picture pasted into the message box is attached too
  $("#prompt").addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData ? ev.clipboardData.files : [])];
    if (files.length && modelSees()) { ev.preventDefault(); attachFiles(files); }
  });
}

// ---------------------------------------------------------------- stored pictures

// the data: URL of a stored picture ({id, url}), fetched once
export function pictureData(img) {
  if (!stored.has(img.id)) {
    const p = api(img.url, { raw: true }).then((res) => res.blob()).then(readAsDataUrl);
    p.catch(() => stored.delete(img.id)); // a failed fetch is tried again next time
    stored.set(img.id, p);
  }
  return stored.get(img.id);
}

// a message just stored from these data: URLs: its pictures need no fetch
export function remember(message, dataUrls) {
  (message.images || []).forEach((img, i) => { if (dataUrls[i]) stored.set(img.id, Promise.resolve(dataUrls[i])); });
}

// The message's content for /v1/chat/completions: its text, or (with pictures) image_url and text parts
// in the order they were stored; offsets count characters (code points), as Array.from does.
export async function contentOf(m) {
  if (!m.images || !m.images.length) return m.content;
  const chars = Array.from(m.content);
  const parts = [];
  let at = 0;
  for (const img of m.images) {
    if (img.offset > at) parts.push({ type: "text", text: chars.slice(at, img.offset).join("") });
    parts.push({ type: "image_url", image_url: { url: await pictureData(img) } });
    at = img.offset;
  }
  if (at < chars.length) parts.push({ type: "text", text: chars.slice(at).join("") });
  return parts;
}

export async function dataUrlsOf(m) {
  return Promise.all((m.images || []).map(pictureData));
}

// the body of a user message: its text with its pictures where they sit
export function userBody(body, m) {
  if (!m.images || !m.images.length) { body.textContent = m.content; return; }
  const chars = Array.from(m.content);
  let at = 0;
  const nodes = [];
  for (const img of m.images) {
    if (img.offset > at) nodes.push(chars.slice(at, img.offset).join(""));
    nodes.push(pictureNode(img));
    at = img.offset;
  }
  if (at < chars.length) nodes.push(chars.slice(at).join(""));
  body.replaceChildren(...nodes);
}

export function pictureNodes(m) { return (m.images || []).map(pictureNode); }

function pictureNode(img) {
  const node = el("img", { class: "msg-image", "data-testid": "message-image", "data-id": img.id,
    alt: `picture (${img.width}x${img.height})`, width: img.width, height: img.height });
  // a picture smaller than its place is enlarged with sharp pixels (the model's own are 24x24)
  node.addEventListener("load", () => node.classList.toggle("pixelated", node.naturalWidth < 160));
  pictureData(img).then((url) => { node.src = url; }, (e) => { node.alt = `picture ${img.id} could not be loaded: ${e.message}`; });
  return node;
}
