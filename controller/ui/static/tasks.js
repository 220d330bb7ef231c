// The newest tasks on every node, as they are queued, taken and ended.
import { api, h, replace, start } from "/static/kumo.js";

async function refresh() {
  const tasks = (await api("GET", "/v1/tasks?limit=100")).tasks;
  replace("tasks", tasks.map((t) => h("tr", { "data-state": t.state }, h("td", {}, t.id),
    h("td", {}, h("a", { href: `/nodes/${encodeURIComponent(t.node)}` }, t.node)), h("td", {}, t.kind),
    h("td", {}, (t.payload && t.payload.name) || ""), h("td", {}, t.state), h("td", {}, t.updated_at), h("td", {}, t.error || ""))));
}

start(["tasks"], refresh);
