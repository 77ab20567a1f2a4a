// Attention drawn over pictures, for the viewer (attention.js): a ViT's attention over its patches
// (view.image: the pixels inline, drawn on the viewer's image canvas) and a chat model's attention over
// the pictures it read (view.pictures: [{index, first_token, n_tokens, grid: [rows, cols], src?, url?}]:
// where each picture's N image tokens sit among the keys and its sqrt(N) x sqrt(N) grid; src is a data:
// URL, else ui.pictureSrc(picture) -> Promise<URL> fetches it: the web page's does so with its API key).
//
// A picture is shown as the model framed it (data/scenes.py: centred in a white square, which the grid
// covers), and a canvas lies over it: each cell is the chosen token's weight on that image token, its
// opacity relative to the picture's strongest cell (the weights normalised over the picture's tokens),
// and a caption says what share of the token's attention the picture got in all.
//
// attention.js imports this module; picochat/inspect/html.py inlines both into one script (this one
// first, the import line dropped), so no top-level name here may repeat one of attention.js's.

const PICTURE_SIDE = 240; // px on screen: a 24x24 model input and a photo alike
const HEAT_RGB = "255, 69, 0";

// fig: the viewer's image panel; canvas: its canvas (the ViT's); ui: {sizeCanvas(c, w, h) -> ctx, active(),
// hovered(), matrix(), set(patch), pin(a), showTip(ev, text), hideTip(), label(token, n): a token shown on one
// line in at most n characters, clip(text, n), pictureSrc?}
export function mountImages(fig, canvas, view, ui) {
  const pictures = Array.isArray(view.pictures) ? view.pictures : [];
  fig.hidden = !view.image && !pictures.length;
  canvas.parentElement.hidden = !view.image;
  const boxes = pictures.map(pictureBox);
  if (boxes.length) {
    fig.querySelector("figcaption").textContent = `Where the chosen token looks in the picture${boxes.length > 1 ? "s" : ""}`;
    const wrap = document.createElement("div");
    wrap.className = "attn-pictures";
    wrap.append(...boxes.map((b) => b.node));
    fig.append(wrap);
    fig.parentElement.prepend(fig); // the picture is what a reader of an answer about it looks at first
  }
  let patches = null; // ViT geometry of the last drawing, for the mouse
  let last = null; // the matrix last drawn: a picture that loads later is drawn with it

  function pictureBox(p) {
    const div = (cls) => { const d = document.createElement("div"); d.className = cls; return d; };
    const node = div("attn-picture"), frame = div("attn-picture-frame");
    node.dataset.testid = "attn-picture";
    node.dataset.index = String(p.index);
    const img = document.createElement("img");
    img.className = "attn-picture-img";
    img.dataset.testid = "attn-picture-img";
    img.alt = `picture ${p.index}`;
    const over = document.createElement("canvas");
    over.className = "attn-picture-overlay";
    over.dataset.testid = "attn-picture-overlay";
    const cap = document.createElement("p");
    cap.className = "attn-picture-caption";
    cap.dataset.testid = "attn-picture-caption";
    frame.append(img, over);
    node.append(frame, cap);
    const b = { p, node, img, over, cap, problem: "" };
    // a small picture is enlarged with sharp pixels (a model's own are 24x24)
    img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < PICTURE_SIDE / 2));
    const source = p.src ? Promise.resolve(p.src) : ui.pictureSrc ? ui.pictureSrc(p)
      : Promise.reject(new Error("this page has no way to fetch it"));
    source.then((url) => { img.src = url; }, (e) => {
      b.problem = `Picture ${p.index} could not be loaded (${(e && e.message) || e}); the cells are drawn without it.`;
      if (last) drawPicture(b, last);
    });
    over.addEventListener("mousemove", (ev) => {
      const m = ui.matrix(), k = cellAt(b, ev);
      if (!m || k === null) return ui.hideTip();
      const q = queryOf(m), w = m.M[q * m.Tk + p.first_token + k] || 0, total = pictureWeights(b, m, q).total;
      ui.showTip(ev, `picture ${p.index}, patch ${Math.floor(k / p.grid[1])},${k % p.grid[1]} (token ` +
        `${p.first_token + k}): ${w.toFixed(4)}` + (total > 0 ? `, ${(100 * w / total).toFixed(1)}% of the picture's share` : ""));
    });
    over.addEventListener("mouseleave", () => ui.hideTip());
    // clicking a cell chooses that image token: what did this part of the picture look at?
    over.addEventListener("click", (ev) => { const k = cellAt(b, ev); if (k !== null) ui.pin({ side: "q", index: p.first_token + k }); });
    return b;
  }

  function cellAt(b, ev) {
    const [rows, cols] = b.p.grid, r = Math.floor(ev.offsetY / (PICTURE_SIDE / rows)), c = Math.floor(ev.offsetX / (PICTURE_SIDE / cols));
    return r >= 0 && c >= 0 && r < rows && c < cols ? r * cols + c : null;
  }
  const queryOf = (m) => { const a = ui.active(); return a && a.side === "q" ? a.index : m.Tq - 1; };
  function pictureWeights(b, m, q) {
    const { first_token: k0, n_tokens: n } = b.p, w = new Float32Array(n);
    let total = 0, best = 0;
    for (let i = 0; i < n; i++) { w[i] = m.M[q * m.Tk + k0 + i] || 0; total += w[i]; if (w[i] > w[best]) best = i; }
    return { w, total, best };
  }
  const pct = (x) => `${(100 * x).toFixed(x < 0.1 ? 1 : 0)}%`;

  function drawPicture(b, m) {
    const { p, over, cap } = b, [rows, cols] = p.grid, q = queryOf(m), k0 = p.first_token;
    const { w, total, best } = pictureWeights(b, m, q), max = w[best];
    const ctx = ui.sizeCanvas(over, PICTURE_SIDE, PICTURE_SIDE), ch = PICTURE_SIDE / rows, cw = PICTURE_SIDE / cols;
    for (let i = 0; i < w.length; i++) {
      if (!(max > 0) || w[i] <= 0) continue;
      ctx.fillStyle = `rgba(${HEAT_RGB}, ${(0.85 * w[i] / max).toFixed(3)})`;
      ctx.fillRect((i % cols) * cw, Math.floor(i / cols) * ch, cw, ch);
    }
    ctx.strokeStyle = "rgba(120, 120, 120, .45)"; // the grid of image tokens
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let r = 1; r < rows; r++) { ctx.moveTo(0, r * ch); ctx.lineTo(PICTURE_SIDE, r * ch); }
    for (let c = 1; c < cols; c++) { ctx.moveTo(c * cw, 0); ctx.lineTo(c * cw, PICTURE_SIDE); }
    ctx.stroke();
    if (q >= k0 && q < k0 + w.length) { // the chosen token is one of this picture's: its own cell
      ctx.strokeStyle = "#0891b2"; ctx.lineWidth = 2;
      ctx.strokeRect(((q - k0) % cols) * cw + 1, Math.floor((q - k0) / cols) * ch + 1, cw - 2, ch - 2);
    }
    const tok = `"${ui.label(m.g.queries[q], 40)}"`; // (already escaped for show: not JSON.stringify'd again)
    const text = q < k0
      ? `${tok} (token ${q}) comes before picture ${p.index}: it cannot look at it (a token attends only to itself and what precedes it).`
      : `${tok} (token ${q}) gives ${pct(total)} of its attention to picture ${p.index} (${w.length} image tokens, ` +
        `a ${rows}\u00D7${cols} grid)` + (total > 0 ? `; ${pct(max / total)} of that goes to row ${Math.floor(best / cols)}, ` +
        `column ${best % cols}.` : ".");
    cap.textContent = b.problem ? `${text} ${b.problem}` : text;
    Object.assign(b.node.dataset, { query: String(q), share: total.toFixed(4) });
  }

  // a ViT: the pixels inline, the chosen token's row over its patches ([CLS] or the last token by default)
  function drawPatches(m) {
    const { pixels, grid } = view.image, [rows, cols] = grid, Hp = pixels.length, Wp = pixels[0].length;
    const { M, Tq, Tk, g } = m, firstKey = view.image.first_key ?? Tk - rows * cols;
    const scale = Math.max(1, Math.floor(256 / Math.max(Hp, Wp)));
    const ctx = ui.sizeCanvas(canvas, Wp * scale, Hp * scale + 20);
    const off = document.createElement("canvas");
    off.width = Wp; off.height = Hp;
    const oc = off.getContext("2d"), data = oc.createImageData(Wp, Hp);
    for (let y = 0; y < Hp; y++) for (let x = 0; x < Wp; x++) {
      const v = pixels[y][x], p = (y * Wp + x) * 4, rgb = Array.isArray(v) ? v : [v, v, v];
      for (let c = 0; c < 3; c++) data.data[p + c] = Math.round(255 * rgb[c]);
      data.data[p + 3] = 255;
    }
    oc.putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, Wp * scale, Hp * scale);
    const a = ui.active();
    const q = a && a.side === "q" ? a.index : (view.kind === "vit" ? 0 : Tq - 1);
    const ph = (Hp * scale) / rows, pw = (Wp * scale) / cols;
    let max = 0;
    for (let p = 0; p < rows * cols; p++) max = Math.max(max, M[q * Tk + firstKey + p] || 0);
    for (let p = 0; p < rows * cols; p++) {
      const w = M[q * Tk + firstKey + p] || 0;
      ctx.fillStyle = `rgba(${HEAT_RGB}, ${max > 0 ? 0.8 * (w / max) : 0})`;
      ctx.fillRect((p % cols) * pw, Math.floor(p / cols) * ph, pw, ph);
    }
    ctx.strokeStyle = "rgba(255, 255, 255, .35)"; // the patch grid
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let r = 1; r < rows; r++) { ctx.moveTo(0, r * ph); ctx.lineTo(Wp * scale, r * ph); }
    for (let c = 1; c < cols; c++) { ctx.moveTo(c * pw, 0); ctx.lineTo(c * pw, Hp * scale); }
    ctx.stroke();
    if (g.queries.length === Tk && q >= firstKey && q < firstKey + rows * cols) { // the looking token's own patch
      const p = q - firstKey;
      ctx.strokeStyle = "#22d3ee"; ctx.lineWidth = 2;
      ctx.strokeRect((p % cols) * pw + 1, Math.floor(p / cols) * ph + 1, pw - 2, ph - 2);
    }
    ctx.fillStyle = m.ink; ctx.textBaseline = "top"; ctx.textAlign = "left";
    ctx.fillText(ui.clip(`${ui.label(g.queries[q], 60)} looks at (max ${max.toFixed(3)})`, 60), 0, Hp * scale + 4);
    patches = { rows, cols, ph, pw, firstKey, Hp: Hp * scale };
  }
  canvas.addEventListener("mousemove", (ev) => {
    const m = ui.matrix();
    if (!patches || !m || ev.offsetY >= patches.Hp || m.g.queries.length !== m.Tk) return ui.hideTip();
    const p = Math.floor(ev.offsetY / patches.ph) * patches.cols + Math.floor(ev.offsetX / patches.pw);
    ui.showTip(ev, `patch ${p} (row ${Math.floor(p / patches.cols)}, column ${p % patches.cols})`);
    const h = ui.hovered();
    if (!h || h.index !== patches.firstKey + p) ui.set({ hover: { side: "q", index: patches.firstKey + p } });
  });
  canvas.addEventListener("click", () => { const h = ui.hovered(); if (h) ui.pin({ side: "q", index: h.index }); });

  return {
    draw(m) {
      last = m;
      if (view.image) drawPatches(m);
      for (const b of boxes) drawPicture(b, m);
    },
  };
}
