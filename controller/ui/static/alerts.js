// Alerts the nodes' monitoring rules raised, firing first, as they arrive.
import { all, byId, h, replace, start } from "/static/kumo.js";

async function refresh() {
  const which = byId("which").value;
  const alerts = await all(`/v1/alerts${which ? `?state=${which}` : ""}`, "alerts");
  replace("alerts", alerts.length ? alerts.map((a) => h("tr", { "data-state": a.state },
    h("td", {}, h("a", { href: `/nodes/${encodeURIComponent(a.node)}` }, a.node)), h("td", {}, a.rule),
    h("td", { class: a.state === "firing" ? "firing" : "" }, a.state), h("td", {}, a.severity), h("td", {}, a.starts_at),
    h("td", {}, a.value ?? ""), h("td", {}, (a.annotations || {}).summary || "")))
    : h("tr", {}, h("td", { colspan: 7 }, which ? `No ${which} alert.` : "No alert yet.")));
}

byId("which").addEventListener("change", refresh);
start(["alerts"], refresh);
