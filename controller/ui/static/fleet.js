// The fleet: every node with its state, kinds, CPU and memory (committed and used) and
// firing alerts, a page of PAGE nodes at a time. The filter is the controller's (?q=: part
// of an id or hostname, over the whole fleet); sorting and the state filter act on the page.
import { all, api, bars, byId, h, replace, start } from "/static/kumo.js";

const PAGE = 100;
const COLUMNS = [["id", "Node"], ["hostname", "Hostname"], ["state", "State"], ["kinds", "Kinds"],
  ["cpu", "CPU"], ["memory", "Memory"], ["instances", "Instances"], ["alerts", "Firing alerts"]];
let sortKey = "id";
let ascending = true;
let cursors = [null];  // the cursor of each page shown so far
let rows = [];

function kinds(node) {
  return Object.values(node.plugins || {}).filter((p) => p.available).flatMap((p) => p.kinds || []).sort();
}

async function refresh() {
  const after = cursors[cursors.length - 1];
  const match = byId("filter").value.trim();
  const page = await api("GET", `/v1/nodes?limit=${PAGE}${after ? `&after=${encodeURIComponent(after)}` : ""}`
    + `${match ? `&q=${encodeURIComponent(match)}` : ""}`);
  const committed = {};
  for (const instance of await all("/v1/instances", "instances")) {
    const use = (committed[instance.node] ||= { vcpus: 0, memory_mib: 0 });
    use.vcpus += instance.vcpus || 0;
    use.memory_mib += instance.memory_mib || 0;
  }
  const firing = {};
  for (const alert of await all("/v1/alerts?state=firing", "alerts")) firing[alert.node] = (firing[alert.node] || 0) + 1;
  rows = page.nodes.map((node) => {
    const use = committed[node.id] || { vcpus: 0, memory_mib: 0 };
    const measured = (node.usage || {}).node;
    return {
      node, id: node.id, hostname: node.hostname, state: node.drained ? `${node.state}, drained` : node.state,
      kinds: kinds(node).join(" "), instances: node.instances.length, alerts: firing[node.id] || 0,
      cpus: node.facts.cpus || 0, cpu: use.vcpus, cpuUsed: measured ? measured.cpu_busy * (node.facts.cpus || 0) : null,
      memMiB: (node.facts.memory_bytes || 0) / 1048576, memory: use.memory_mib,
      memUsed: measured ? measured.memory_used_bytes / 1048576 : null,
    };
  });
  byId("next").disabled = !page.next;
  byId("next").dataset.cursor = page.next || "";
  byId("first").disabled = cursors.length === 1;
  render();
}

function render() {
  const wanted = byId("state").value;
  const shown = rows.filter((r) => !wanted || r.state.includes(wanted));
  shown.sort((a, b) => (a[sortKey] < b[sortKey] ? -1 : a[sortKey] > b[sortKey] ? 1 : 0) * (ascending ? 1 : -1));
  replace("nodes-head", h("tr", {}, COLUMNS.map(([key, label]) => h("th", {
    scope: "col", "aria-sort": key === sortKey ? (ascending ? "ascending" : "descending") : "none" },
  h("button", { type: "button", class: "sort", onclick: () => {
    ascending = key === sortKey ? !ascending : true;
    sortKey = key;
    render();
  } }, label)))));
  replace("nodes-body", shown.length ? shown.map((r) => h("tr", { "data-node": r.id, "data-state": r.node.state },
    h("td", {}, h("a", { href: `/nodes/${encodeURIComponent(r.id)}` }, r.id)),
    h("td", {}, r.hostname),
    h("td", { class: `state ${r.node.state}` }, r.state),
    h("td", {}, r.kinds),
    h("td", {}, bars("CPU", r.cpu, r.cpuUsed, r.cpus, "CPUs")),
    h("td", {}, bars("Memory", r.memory, r.memUsed, r.memMiB, "MiB")),
    h("td", {}, r.instances),
    h("td", { class: r.alerts ? "firing" : "" }, r.alerts))) : h("tr", {}, h("td", { colspan: COLUMNS.length }, "No node matches.")));
}

let typing = null;
byId("filter").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { cursors = [null]; refresh(); }, 300);
});
byId("state").addEventListener("change", render);
byId("next").addEventListener("click", () => { cursors.push(byId("next").dataset.cursor); refresh(); });
byId("first").addEventListener("click", () => { cursors = [null]; refresh(); });
start(["nodes", "instances", "alerts"], refresh);
