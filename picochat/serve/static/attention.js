// The attention viewer: no dependencies but its sibling attention-images.js (the drawings over pictures),
// used by the web page (an answer's "Attention" button) and inlined with that sibling by
// picochat/inspect/html.py into the standalone page `picochat attention` writes.
//
// view = AttentionView.to_json(): {kind, title, meta, image, groups: {name: {queries, keys, causal,
// layers, heads, weights[L][H][Tq][Tk]}}}, plus optional fields: answer_start (the first token of the
// answer: marked in both drawings); layer (the groups hold only that layer) or layer_ids (the layer
// number of each one they hold), with n_layers the model's count: options.loadLayer(l) ->
// Promise<view of layer l> fetches the others (the web page does, one layer per request).
// image (ViT): {pixels: [H][W] (or [H][W][3]) in 0..1, grid: [rows, cols], first_key?: the index of the
// first patch among the keys (default: the last rows*cols keys)}: the chosen token's attention over
// the patches is drawn over the picture.
// pictures (a chat model that sees): [{index, first_token, n_tokens, grid, src? or url}] (docs/api.md):
// the chosen token's attention over each picture's image tokens is drawn over that picture, fetched by
// options.pictureSrc(picture) -> Promise<URL> when it has no src (attention-images.js).
//
// Everything is drawn on <canvas> and styled from attention.css through classes (the page's CSP
// forbids inline style attributes; setting element.style from script is allowed).

import { mountImages } from "./attention-images.js";

const BLUES = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
const MASKED = [214, 214, 214]; // where the mask forbids looking: not "zero weight", nothing at all
const LUT = (() => {
  const t = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (BLUES.length - 1), k = Math.min(Math.floor(x), BLUES.length - 2), f = x - k;
    for (let c = 0; c < 3; c++) t[i * 3 + c] = BLUES[k][c] + f * (BLUES[k + 1][c] - BLUES[k][c]);
  }
  return t;
})();
const ROW_H = 18; // lines view: one token per row
const ANSWER = "rgb(234, 88, 12)"; // the answer's tokens, and the line where it starts
const FONT = "11px ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace";
const GROUP_NAMES = { self: "self-attention", encoder: "encoder self-attention", decoder: "decoder self-attention",
  cross: "cross-attention (decoder reads encoder)" };

// how a token reads on one line: whitespace made visible, control characters as escapes
export function showToken(t) {
  return String(t).replace(/ /g, "\u00B7").replace(/\n/g, "\u21B5").replace(/\t/g, "\u21E5").replace(/\r/g, "\u240D")
    .replace(/[\u0000-\u001f\u007f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
}

function el(tag, cls, text) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined) n.textContent = text;
  return n;
}
function option(value, text) { const o = el("option", null, text); o.value = String(value); return o; }
const clip = (s, n) => (s.length > n ? s.slice(0, n - 1) + "\u2026" : s);

function checkView(view) {
  if (!view || typeof view !== "object" || !view.groups || !Object.keys(view.groups).length)
    throw new Error("not an attention view: it has no groups of maps");
  for (const [name, g] of Object.entries(view.groups)) {
    if (!Array.isArray(g.queries) || !Array.isArray(g.keys) || !Array.isArray(g.weights))
      throw new Error(`attention group ${name}: queries, keys and weights must be lists`);
  }
}

export function mountAttention(root, view, options = {}) {
  checkView(view);
  const groups = Object.keys(view.groups);
  const first = view.groups[groups[0]];
  const layerIds = (v) => Array.isArray(v.layer_ids) ? v.layer_ids : Number.isInteger(v.layer) ? [v.layer]
    : Object.values(v.groups)[0].weights.map((_, i) => i);
  const ids0 = layerIds(view);
  const nLayers = view.n_layers ?? Math.max(...ids0) + 1;
  const nHeads = first.heads ?? first.weights[0].length;
  const loaded = new Map(); // "group|layer" -> [H][Tq][Tk]
  const addLayers = (v) => {
    const ids = layerIds(v);
    for (const [name, g] of Object.entries(v.groups)) g.weights.forEach((w, i) => loaded.set(`${name}|${ids[i]}`, w));
  };
  addLayers(view);
  const start0 = view.answer_start; // an answer's first token is where a reader starts: chosen at first
  const st = { group: groups[0], layer: ids0[0], head: "avg", scale: "sqrt", hover: null,
    selected: Number.isInteger(start0) && start0 < first.queries.length ? { side: "q", index: start0 } : null, ...(options.initial || {}) };
  let cache = { key: null }, pending = 0, rendered = 0;

  // ------------------------------------------------------------ the DOM
  root.replaceChildren();
  root.classList.add("attn");
  root.dataset.testid = "attention-viewer";
  const head = el("div", "attn-head");
  head.append(el("strong", "attn-title", view.title || "attention"));
  for (const [k, v] of Object.entries(view.meta || {})) head.append(el("span", "attn-meta", `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`));
  const controls = el("div", "attn-controls");
  const select = (label, testid, opts) => {
    const lab = el("label", "attn-label", label + " ");
    const s = el("select");
    s.dataset.testid = testid;
    s.append(...opts);
    lab.append(s);
    controls.append(lab);
    return s;
  };
  const gSel = select("Attention", "attn-group", groups.map((g) => option(g, GROUP_NAMES[g] || g)));
  if (groups.length < 2) gSel.parentElement.hidden = true;
  const lSel = select("Layer", "attn-layer", []);
  // the layers one can pick in a group: all when they can be fetched, else those in the view (an
  // encoder and a decoder may have different counts)
  const layersOf = (name) => options.loadLayer ? Array.from({ length: nLayers }, (_, i) => i)
    : [...loaded.keys()].filter((k) => k.startsWith(name + "|")).map((k) => Number(k.slice(name.length + 1))).sort((x, y) => x - y);
  const fillLayers = () => {
    const ids = layersOf(st.group);
    lSel.replaceChildren(...ids.map((i) => option(i, String(i))));
    if (!ids.includes(st.layer)) st.layer = ids[Math.min(ids.length - 1, Math.max(0, st.layer))] ?? 0;
  };
  fillLayers();
  const hSel = select("Head", "attn-head", [option("avg", "average of heads"), ...Array.from({ length: nHeads }, (_, i) => option(i, String(i)))]);
  const sSel = select("Shades", "attn-scale", [option("sqrt", "square root (faint weights show)"), option("linear", "linear")]);
  const status = el("span", "attn-status");
  status.setAttribute("role", "status");
  controls.append(status);
  if (!options.loadLayer && ids0.length < nLayers) status.textContent = `${ids0.length} of the model's ${nLayers} layers`;
  const hint = el("p", "attn-hint", "Rows are the tokens that look (queries), columns the tokens they look at (keys); " +
    "each row sums to 1, grey cells are masked. Hover or click a cell or a token; arrow keys move the chosen token." +
    (Number.isInteger(view.answer_start) ? " Orange: the answer's tokens (the dashed lines mark where it starts)." : ""));
  const panel = (title, testid) => {
    const f = el("figure", `attn-panel ${testid}-panel`), box = el("div", "attn-scroll"), c = el("canvas");
    c.dataset.testid = testid;
    c.tabIndex = 0;
    box.append(c);
    f.append(el("figcaption", null, title), box);
    return [f, c];
  };
  const [heatFig, heat] = panel("Heatmap", "attn-heatmap");
  const [lineFig, lines] = panel("Lines: the chosen token and what it attends to", "attn-lines");
  const [imgFig, img] = panel("Attention over the image's patches", "attn-image");
  const panels = el("div", "attn-panels");
  panels.append(heatFig, lineFig, imgFig);
  const tip = el("div", "attn-tip");
  tip.hidden = true;
  root.append(head, controls, hint, panels, tip);

  // ------------------------------------------------------------ the numbers
  function matrix() {
    const g = view.groups[st.group], w = loaded.get(`${st.group}|${st.layer}`);
    if (!w) return null;
    const key = `${st.group}|${st.layer}|${st.head}`;
    if (cache.key === key) return cache;
    const Tq = g.queries.length, Tk = g.keys.length, M = new Float32Array(Tq * Tk);
    const heads = st.head === "avg" || !w[st.head] ? w : [w[st.head]];
    for (const h of heads) for (let i = 0; i < Tq; i++) { const row = h[i]; for (let j = 0; j < Tk; j++) M[i * Tk + j] += row[j]; }
    if (heads.length > 1) for (let k = 0; k < M.length; k++) M[k] /= heads.length;
    cache = { key, M, Tq, Tk, g, img: null, widths: null, ink: null };
    return cache;
  }
  function widths(m) { // label widths, measured once per matrix (hover redraws often)
    if (!m.widths) {
      const c = heat.getContext("2d");
      c.font = FONT;
      const w = (toks, n, cap) => Math.min(cap, Math.max(0, ...toks.map((t) => c.measureText(clip(showToken(t), n)).width)) + 10);
      m.widths = { hq: w(m.g.queries, 18, 120), hk: w(m.g.keys, 18, 120), wq: w(m.g.queries, 22, 150), wk: w(m.g.keys, 22, 150) };
    }
    return m.widths;
  }
  const masked = (g, i, j) => g.causal && j > i + (g.keys.length - g.queries.length);
  const shade = (v) => Math.max(0, Math.min(255, Math.round((st.scale === "sqrt" ? Math.sqrt(Math.max(v, 0)) : v) * 255)));
  const active = () => st.hover || st.selected;
  const answerStart = () => (st.group === "self" || st.group === "decoder") && Number.isInteger(view.answer_start) ? view.answer_start : null;

  function sizeCanvas(c, w, h) {
    const dpr = window.devicePixelRatio || 1;
    c.width = Math.max(1, Math.round(w * dpr));
    c.height = Math.max(1, Math.round(h * dpr));
    c.style.width = `${w}px`;
    c.style.height = `${h}px`;
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.font = FONT;
    return ctx;
  }

  // ------------------------------------------------------------ heatmap
  let hm = null; // geometry of the last heatmap: {x0, y0, cell, Tq, Tk}
  function drawHeatmap(m) {
    const { M, Tq, Tk, g } = m;
    const avail = Math.max(200, (heatFig.clientWidth || 600) - 12);
    let cell = Math.max(1, Math.min(26, Math.floor((avail - 8) / Tk)));
    const labels = cell >= 11; // token names beside the rows and above the columns when they fit (11px font)
    const x0 = labels ? widths(m).hq : 4, y0 = labels ? widths(m).hk : 4;
    if (labels) cell = Math.max(11, Math.min(26, Math.floor((avail - x0) / Tk)));
    const ctx = sizeCanvas(heat, x0 + Tk * cell + 4, y0 + Tq * cell + 4);
    if (!m.img) { // the cells, one pixel each, scaled up by drawImage (no smoothing): fast at any size
      const off = document.createElement("canvas");
      off.width = Tk; off.height = Tq;
      const oc = off.getContext("2d"), data = oc.createImageData(Tk, Tq);
      for (let i = 0; i < Tq; i++) for (let j = 0; j < Tk; j++) {
        const p = (i * Tk + j) * 4, s = shade(M[i * Tk + j]) * 3;
        const c = masked(g, i, j) ? MASKED : [LUT[s], LUT[s + 1], LUT[s + 2]];
        data.data[p] = c[0]; data.data[p + 1] = c[1]; data.data[p + 2] = c[2]; data.data[p + 3] = 255;
      }
      oc.putImageData(data, 0, 0);
      m.img = off;
    }
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(m.img, x0, y0, Tk * cell, Tq * cell);
    ctx.fillStyle = m.ink;
    if (labels) {
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      g.queries.forEach((t, i) => ctx.fillText(clip(showToken(t), 18), x0 - 4, y0 + (i + 0.5) * cell));
      ctx.save();
      ctx.translate(x0, y0 - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      g.keys.forEach((t, j) => ctx.fillText(clip(showToken(t), 18), 0, (j + 0.5) * cell));
      ctx.restore();
    }
    const a0 = answerStart();
    if (a0 !== null && a0 > 0) { // where the answer starts: below this row the model was writing
      ctx.strokeStyle = ANSWER;
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.moveTo(x0, y0 + a0 * cell); ctx.lineTo(x0 + Tk * cell, y0 + a0 * cell);
      ctx.moveTo(x0 + a0 * cell, y0); ctx.lineTo(x0 + a0 * cell, y0 + Tq * cell);
      ctx.stroke();
      ctx.setLineDash([]);
    }
    const a = active();
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "rgba(220, 38, 38, .95)";
    if (a && a.side === "q") ctx.strokeRect(x0 - 0.5, y0 + a.index * cell - 0.5, Tk * cell + 1, cell + 1);
    if (a && a.side === "k") ctx.strokeRect(x0 + a.index * cell - 0.5, y0 - 0.5, cell + 1, Tq * cell + 1);
    if (a && a.key !== undefined) { ctx.strokeStyle = "#000"; ctx.strokeRect(x0 + a.key * cell, y0 + a.index * cell, cell, cell); }
    hm = { x0, y0, cell, Tq, Tk };
  }

  // ------------------------------------------------------------ lines
  let ln = null; // geometry of the last lines view, for hit-testing
  function drawLines(m) {
    const { M, Tq, Tk, g } = m, { wq, wk } = widths(m);
    const gap = Math.max(120, Math.min(260, (lineFig.clientWidth || 400) - wq - wk - 16));
    const ctx = sizeCanvas(lines, wq + gap + wk, Math.max(Tq, Tk) * ROW_H + 8);
    const xq = wq, xk = wq + gap, y = (i) => 4 + (i + 0.5) * ROW_H;
    const a = active(), a0 = answerStart();
    const line = (i, j, w, strong) => {
      ctx.strokeStyle = `rgba(${m.blue}, ${strong ? Math.min(1, 0.15 + w * 1.2) : Math.min(0.6, w * 0.6)})`;
      ctx.lineWidth = strong ? 0.5 + 5 * w : 0.5 + 2 * w;
      ctx.beginPath(); ctx.moveTo(xq + 3, y(i)); ctx.lineTo(xk - 3, y(j)); ctx.stroke();
    };
    const onK = new Float32Array(Tk), onQ = new Float32Array(Tq);
    if (a && a.side === "q") { for (let j = 0; j < Tk; j++) { const w = M[a.index * Tk + j]; onK[j] = w; if (w > 0.003) line(a.index, j, w, true); } }
    else if (a && a.side === "k") { for (let i = 0; i < Tq; i++) { const w = M[i * Tk + a.index]; onQ[i] = w; if (w > 0.003) line(i, a.index, w, true); } }
    else { // nothing chosen: every query's strong lines, faintly (capped: a long text has T^2 of them)
      let n = 0;
      for (let i = 0; i < Tq && n < 20000; i++) for (let j = 0; j < Tk; j++) { const w = M[i * Tk + j]; if (w > 0.05) { line(i, j, w, false); n++; } }
    }
    const box = (x, w, i, weight, on) => { // a token's background: its weight; the chosen one outlined
      if (weight > 0) { ctx.fillStyle = `rgba(${m.blue}, ${Math.min(0.55, weight)})`; ctx.fillRect(x, y(i) - ROW_H / 2 + 1, w, ROW_H - 2); }
      if (on) { ctx.strokeStyle = "rgba(220, 38, 38, .95)"; ctx.lineWidth = 1.5; ctx.strokeRect(x, y(i) - ROW_H / 2 + 1, w, ROW_H - 2); }
    };
    ctx.textBaseline = "middle";
    const paint = (toks, side, weights) => toks.forEach((t, i) => {
      box(side === "q" ? 1 : xk + 3, (side === "q" ? wq : wk) - 5, i, weights[i], !!a && a.side === side && a.index === i);
      ctx.fillStyle = a0 !== null && i >= a0 ? ANSWER : m.ink;
      ctx.textAlign = side === "q" ? "right" : "left";
      ctx.fillText(clip(showToken(t), 22), side === "q" ? xq - 5 : xk + 5, y(i));
    });
    paint(g.queries, "q", onQ);
    paint(g.keys, "k", onK);
    ln = { y0: 4, mid: (xq + xk) / 2, Tq, Tk };
  }

  // ------------------------------------------------------------ drawing and events
  function draw() {
    gSel.value = st.group; lSel.value = String(st.layer); hSel.value = String(st.head); sSel.value = st.scale;
    const m = matrix();
    if (!m) { ensureLayer(); return; }
    m.ink = getComputedStyle(root).color || "#222";
    const rgb = (m.ink.match(/\d+/g) || [0, 0, 0]).slice(0, 3).map(Number);
    m.blue = rgb[0] + rgb[1] + rgb[2] > 384 ? "96, 165, 250" : "37, 99, 235"; // light text: a dark page, a lighter blue
    drawHeatmap(m); drawLines(m); images.draw(m);
    rendered += 1;
    Object.assign(root.dataset, { rendered: String(rendered), group: st.group, layer: String(st.layer), head: String(st.head) });
  }
  async function ensureLayer() {
    if (loaded.has(`${st.group}|${st.layer}`)) return draw();
    if (!options.loadLayer) { status.textContent = `layer ${st.layer} is not in this view`; return; }
    const want = st.layer, ticket = ++pending;
    status.textContent = `loading layer ${want}\u2026`;
    root.dataset.loading = "1";
    try {
      const v = await options.loadLayer(want);
      checkView(v);
      addLayers(v);
      if (ticket === pending) { status.textContent = ""; draw(); }
    } catch (e) {
      status.textContent = `layer ${want}: ${e.message || e}`;
      if (options.onError) options.onError(e);
    } finally { if (ticket === pending) root.dataset.loading = "0"; }
  }
  const set = (patch) => { Object.assign(st, patch); draw(); };
  gSel.addEventListener("change", () => { st.group = gSel.value; fillLayers(); set({ selected: null, hover: null }); });
  lSel.addEventListener("change", () => set({ layer: Number(lSel.value) }));
  hSel.addEventListener("change", () => set({ head: hSel.value === "avg" ? "avg" : Number(hSel.value) }));
  sSel.addEventListener("change", () => { cache.img = null; set({ scale: sSel.value }); });

  const pin = (a) => set({ selected: a && st.selected && st.selected.side === a.side && st.selected.index === a.index ? null : a });
  function showTip(ev, text) {
    tip.textContent = text;
    tip.hidden = false;
    const r = root.getBoundingClientRect();
    tip.style.left = `${Math.min(ev.clientX - r.left + 14, r.width - 260)}px`;
    tip.style.top = `${ev.clientY - r.top + 16}px`;
  }
  const hideTip = () => { tip.hidden = true; if (st.hover) set({ hover: null }); };
  const q = (t) => JSON.stringify(t);
  function heatAt(ev) {
    if (!hm) return null;
    const j = Math.floor((ev.offsetX - hm.x0) / hm.cell), i = Math.floor((ev.offsetY - hm.y0) / hm.cell);
    return i >= 0 && j >= 0 && i < hm.Tq && j < hm.Tk ? { side: "q", index: i, key: j } : null;
  }
  heat.addEventListener("mousemove", (ev) => {
    const a = heatAt(ev), m = matrix();
    if (!a || !m) return hideTip();
    const g = m.g, w = m.M[a.index * m.Tk + a.key];
    showTip(ev, `${q(g.queries[a.index])} (${a.index}) \u2192 ${q(g.keys[a.key])} (${a.key}): ` +
      (masked(g, a.index, a.key) ? "masked" : w.toFixed(4)));
    const h = st.hover;
    if (!h || h.side !== "q" || h.index !== a.index || h.key !== a.key) set({ hover: a });
  });
  heat.addEventListener("click", (ev) => { const a = heatAt(ev); if (a) pin({ side: "q", index: a.index }); });
  function lineAt(ev) {
    if (!ln) return null;
    const side = ev.offsetX < ln.mid ? "q" : "k", i = Math.floor((ev.offsetY - ln.y0) / ROW_H);
    return i >= 0 && i < (side === "q" ? ln.Tq : ln.Tk) ? { side, index: i } : null;
  }
  lines.addEventListener("mousemove", (ev) => {
    const a = lineAt(ev), m = matrix();
    if (!a || !m) return hideTip();
    showTip(ev, `${a.side === "q" ? "query" : "key"} ${a.index}: ${q((a.side === "q" ? m.g.queries : m.g.keys)[a.index])}`);
    if (!st.hover || st.hover.side !== a.side || st.hover.index !== a.index) set({ hover: a });
  });
  lines.addEventListener("click", (ev) => { const a = lineAt(ev); if (a) pin(a); });
  const images = mountImages(imgFig, img, view, { sizeCanvas, active, matrix, set, pin, showTip, hideTip, clip,
    hovered: () => st.hover, label: (t, n) => clip(showToken(t), n), pictureSrc: options.pictureSrc });
  for (const c of [heat, lines, img]) {
    c.addEventListener("mouseleave", hideTip);
    c.addEventListener("keydown", (ev) => { // the chosen query token, by keyboard
      const m = matrix();
      if (!m || !["ArrowUp", "ArrowDown"].includes(ev.key)) return;
      ev.preventDefault();
      const cur = st.selected && st.selected.side === "q" ? st.selected.index : -1;
      set({ selected: { side: "q", index: Math.max(0, Math.min(m.Tq - 1, cur + (ev.key === "ArrowDown" ? 1 : -1))) } });
    });
  }
  let resizeTimer = null, lastWidth = 0;
  const ro = typeof ResizeObserver === "function" ? new ResizeObserver(() => {
    if (panels.clientWidth === lastWidth) return; // its height follows the drawings: only a new width redraws
    lastWidth = panels.clientWidth;
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(draw, 100);
  }) : null;
  draw();
  lastWidth = panels.clientWidth;
  if (ro) ro.observe(panels);
  return {
    set, draw,
    get state() { return { ...st, nLayers, nHeads, rendered }; },
    destroy() { if (ro) ro.disconnect(); clearTimeout(resizeTimer); root.replaceChildren(); },
  };
}
