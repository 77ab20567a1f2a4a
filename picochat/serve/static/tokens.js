// The token view of an answer: each token tinted by the probability the model gave it, and on hover that
// probability and the alternatives it weighed (GET /api/messages/{id}/tokens: the model's own
// probabilities, read back over the stored conversation, at temperature 1 and without penalties).
import { $, el } from "./dom.js";
import { api, showError } from "./api.js";

const shown = new Map(); // answer id -> its tokens, while its token view is open

export function tokensOf(id) { return shown.get(id); }

export async function toggleTokens(m, rerender) {
  if (shown.has(m.id)) { shown.delete(m.id); hideTip(); rerender(); return; }
  try {
    const r = await api(`/api/messages/${encodeURIComponent(m.id)}/tokens?top=5`);
    shown.set(m.id, r.tokens);
    rerender();
  } catch (e) { showError(e); }
}

const pct = (lp) => `${(100 * Math.exp(lp)).toFixed(1)}%`;
const shownText = (t) => JSON.stringify(t).slice(1, -1); // spaces and newlines made visible

export function tokenNodes(tokens) {
  return tokens.map((t, i) => {
    const p = Math.exp(t.logprob);
    // a token with no text of its own (part of a character split over tokens) still gets a box to hover
    const span = el("span", { class: t.token ? "tok" : "tok tok-empty", "data-testid": "token", "data-i": String(i),
      "data-p": p.toFixed(4), text: t.token || "\u2205" });
    span.style.backgroundColor = `hsla(${Math.round(120 * p)}, 75%, 50%, 0.28)`; // red unlikely ... green sure
    span.addEventListener("mouseenter", () => showTip(span, t));
    span.addEventListener("mouseleave", hideTip);
    return span;
  });
}

function showTip(span, t) {
  const tip = $("#token-tip");
  tip.replaceChildren(
    el("div", { class: "tip-head", "data-testid": "token-tip-chosen", text: `"${shownText(t.token)}"  ${pct(t.logprob)}` }),
    ...t.top.map((a) => el("div", {
      class: "tip-alt" + (a.token === t.token ? " chosen" : ""), "data-testid": "token-tip-alt",
      text: `"${shownText(a.token)}"  ${pct(a.logprob)}`,
    })));
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  tip.style.left = `${Math.max(8, Math.min(r.left, window.innerWidth - tip.offsetWidth - 8))}px`;
  tip.style.top = `${r.bottom + 6 + tip.offsetHeight > window.innerHeight ? r.top - tip.offsetHeight - 6 : r.bottom + 6}px`;
}

export function hideTip() { $("#token-tip").hidden = true; }
