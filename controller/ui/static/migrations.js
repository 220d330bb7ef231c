// The newest migrations, running and ended: phase and bytes moved change as the live stream
// says they did (a running migration's bytes once a second).
import { api, h, replace, start } from "/static/kumo.js";

const node = (id) => (id ? h("a", { href: `/nodes/${encodeURIComponent(id)}` }, id) : "?");

async function refresh() {
  const docs = (await api("GET", "/v1/migrations?limit=100")).migrations;
  replace("migrations", docs.map((m) => {
    const p = m.progress || {};
    const moved = p.bytes_received || 0;
    return h("tr", { "data-id": m.id, "data-state": m.state, "data-phase": m.phase }, h("td", {}, m.id),
      h("td", {}, h("a", { href: `/instances/${encodeURIComponent(m.instance)}?migration=${encodeURIComponent(m.id)}` }, m.instance)),
      h("td", {}, node(m.source)), h("td", {}, node(m.destination)),
      h("td", { class: `state ${m.state}` }, m.state), h("td", {}, m.phase),
      h("td", {}, h("progress", { max: p.bytes_total || 1, value: moved, "aria-label": `bytes moved for ${m.id}` }),
        ` ${moved} of ${p.bytes_total || "?"}`),
      h("td", {}, m.created_at), h("td", { class: m.error ? "error" : null }, m.outcome || m.error || ""));
  }));
}

start(["migrations"], refresh);
