// One node: its facts, each plugin's availability and reason, its instances and alerts;
// drain, undrain and remove.
import { all, api, button, byId, h, params, replace, say, start } from "/static/kumo.js";

const id = params();

async function refresh() {
  const node = await api("GET", `/v1/nodes/${encodeURIComponent(id)}`);
  const alerts = await all(`/v1/alerts?state=firing&node=${encodeURIComponent(id)}`, "alerts");
  replace("title", `Node ${node.id}`);
  document.title = `${node.id} · Kumo`;
  replace("actions",
    h("span", { id: "node-state", class: `state ${node.state}` }, node.drained ? `${node.state}, drained` : node.state),
    node.drained
      ? button("Undrain", async () => { await api("POST", `/v1/nodes/${encodeURIComponent(id)}/undrain`); return `${id} takes new instances again`; })
      : button("Drain", async () => {
        const answer = await api("POST", `/v1/nodes/${encodeURIComponent(id)}/drain`);
        const moving = answer.evacuation.moving.map((m) => `${m.instance} (${m.mode})`).join(", ");
        const staying = answer.evacuation.staying.map((s) => `${s.name}: ${s.reason}`).join("; ");
        return `${id} is drained: ${moving ? `moving ${moving}` : "nothing to move"}${staying ? `; staying: ${staying}` : ""}`;
      }),
    button("Remove", async () => {
      if (!window.confirm(`Remove node ${id} and revoke its certificates?`)) return null;
      await api("DELETE", `/v1/nodes/${encodeURIComponent(id)}`);
      say(`${id} was removed`);
      return null;
    }, { class: "danger" }));
  const facts = { hostname: node.hostname, "last seen": node.last_seen, "agent version": node.agent_version,
    ...node.facts, capacity: JSON.stringify(node.capacity) };
  replace("facts", Object.entries(facts).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : v)]));
  replace("plugins", Object.entries(node.plugins).sort().map(([name, p]) => h("tr", {},
    h("th", { scope: "row" }, name), h("td", {}, p.available ? "yes" : "no"), h("td", {}, (p.kinds || []).join(" ")),
    h("td", {}, p.reason || ""))));
  replace("instances", node.instances.length ? node.instances.map((i) => h("tr", {},
    h("td", {}, h("a", { href: `/instances/${encodeURIComponent(i.name)}` }, i.name)), h("td", {}, i.kind), h("td", {}, i.state)))
    : h("tr", {}, h("td", { colspan: 3 }, "none")));
  replace("alerts", alerts.length ? alerts.map((a) => h("li", {}, `${a.rule} (${a.severity}) since ${a.starts_at}`)) : h("li", {}, "none firing"));
  byId("main").dataset.node = node.id;
}

start(["nodes", "instances", "alerts"], refresh);
