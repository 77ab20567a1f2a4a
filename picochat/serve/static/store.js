// The page's shared state and the conversation tree (messages linked by parent_id; the branch
// shown is the path from the root to state.leafId).

// render.js and sidebar.js call back into chat.js through this table (filled in by app.js), so
// that the modules import each other in one direction only.
export const handlers = {};

export const state = {
  config: null,
  models: [],
  convId: null,
  conv: null,
  byId: new Map(),
  children: new Map(), // parent id (or "root") -> messages, oldest first
  leafId: null,
  generating: null, // {controller, userId, text, node}
  compare: null, // {userId, aId, bId}
  editingId: null,
};

// ---------------------------------------------------------------- the conversation tree

export function setMessages(messages) {
  state.byId = new Map();
  state.children = new Map();
  const sorted = [...messages].sort((a, b) => a.id - b.id);
  for (const m of sorted) {
    state.byId.set(m.id, m);
    const key = m.parent_id ?? "root";
    if (!state.children.has(key)) state.children.set(key, []);
    state.children.get(key).push(m);
  }
}

export function siblingsOf(m) { return state.children.get(m.parent_id ?? "root") || [m]; }

// the newest leaf under a message (follow the newest child)
export function newestLeafUnder(id) {
  let cur = state.byId.get(id);
  for (;;) {
    const kids = state.children.get(cur.id);
    if (!kids || !kids.length) return cur.id;
    cur = kids[kids.length - 1];
  }
}

export function newestMessageId() {
  let best = null;
  for (const m of state.byId.values()) if (best === null || m.id > best) best = m.id;
  return best;
}

export function pathTo(id) {
  const path = [];
  let cur = id == null ? null : state.byId.get(id);
  while (cur) {
    path.push(cur);
    cur = cur.parent_id == null ? null : state.byId.get(cur.parent_id);
  }
  return path.reverse();
}
