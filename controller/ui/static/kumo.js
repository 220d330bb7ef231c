// What every page shares: the session, the API with its CSRF token, the page's one live
// stream, and building DOM from data (text nodes only: nothing from the API becomes HTML).

// The session (its CSRF token), once start() has it: a click before that waits for it.
let signedIn;
const session = new Promise((resolve) => { signedIn = resolve; });

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-Kumo-CSRF"] = (await session).csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `${method} ${path}: HTTP ${response.status}`);
    error.data = data;
    throw error;
  }
  return data;
}

// Every page of a paged list (?limit=&after=), joined.
export async function all(path, key) {
  const items = [];
  let after = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api("GET", `${path}${sep}limit=1000${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page[key]);
    after = page.next;
  } while (after);
  return items;
}

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function replace(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat());
}

// Committed (reserved by instances) and used (measured) against the node's total, as meters.
export function bars(label, committed, used, total, unit) {
  const text = `${label} ${fmt(committed)} committed, ${used === null ? "unknown" : fmt(used)} used of ${fmt(total)} ${unit}`;
  return h("div", { class: "bars", title: text },
    h("meter", { min: 0, max: total || 1, value: committed, "aria-label": `${label} committed` }),
    h("meter", { class: "used", min: 0, max: total || 1, value: used ?? 0, "aria-label": `${label} used` }),
    h("small", {}, `${fmt(committed)}/${used === null ? "?" : fmt(used)}/${fmt(total)} ${unit}`));
}

function fmt(value) {
  return Number.isInteger(value) ? String(value) : Number(value).toFixed(1);
}

export function say(text, kind = "info") {
  replace("notice", text ? h("p", { class: kind }, text) : "");
}

// A button whose click runs `action`, saying how it ended in the page's notice.
export function button(label, action, attrs = {}) {
  return h("button", { type: "button", ...attrs, onclick: async (event) => {
    const target = event.currentTarget;
    target.disabled = true;
    try {
      const done = await action();
      if (done) say(done);
    } catch (error) {
      say(error.message, "error");
    } finally {
      target.disabled = false;
    }
  } }, label);
}

export const byId = (id) => document.getElementById(id);

// Start a page: learn the session, then render with `refresh` now and again whenever the
// live stream names one of `topics`. One refresh at a time; changes meanwhile make one more.
export async function start(topics, refresh) {
  const answer = await fetch("/ui/session");
  if (!answer.ok) return signedOut();
  const mine = await answer.json();
  signedIn(mine);
  replace("who", `signed in as ${mine.name} until ${mine.expires_at}`);
  let running = false;
  let again = false;
  const run = async () => {
    if (running) { again = true; return; }
    running = true;
    try {
      await refresh();
      document.body.dataset.loaded = String(Date.now());
    } catch (error) {
      say(error.message, "error");
    } finally {
      running = false;
      if (again) { again = false; run(); }
    }
  };
  const source = new EventSource("/ui/events");
  source.addEventListener("change", (event) => {
    if (JSON.parse(event.data).topics.some((topic) => topics.includes(topic))) run();
  });
  source.addEventListener("error", async () => {
    if ((await fetch("/ui/session")).status === 401) { source.close(); signedOut(); }
  });
  await run();
}

function signedOut() {
  replace("main", h("p", { class: "error" }, "Signed out: the session expired or was revoked. Run kumoctl ui for a new sign-in link."));
}

export function params(name) {
  return decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || name);
}

// A migration's phase and bytes moved, as the migration and instance pages show it.
export function migrationView(doc) {
  const p = doc.progress || {};
  const total = p.bytes_total || 0;
  return h("div", { class: "migration", "data-state": doc.state, "data-phase": doc.phase },
    h("h2", {}, `Migration ${doc.id}`),
    h("p", {}, `${doc.instance}: ${doc.source} → ${doc.destination || "?"}, ${doc.state}, phase ${doc.phase}`),
    h("progress", { max: total || 1, value: p.bytes_received || 0, "aria-label": "bytes received" }),
    h("p", {}, `${p.bytes_received || 0} of ${total || "?"} bytes received`),
    doc.error ? h("p", { class: "error" }, doc.error) : null,
    doc.outcome ? h("p", {}, doc.outcome) : null);
}
