// Log forwarding: the fleet's setting, each node's effective one, and per-node overrides.
import { api, button, byId, h, replace, say, start } from "/static/kumo.js";

function describe(setting) {
  return setting && setting.target ? `${setting.target} over ${setting.protocol}${setting.tls ? " with TLS" : ""}` : "nowhere";
}

async function refresh() {
  const setting = await api("GET", "/v1/logging");
  const fleet = setting.fleet || {};
  if (document.activeElement === document.body) {  // not while someone is typing
    byId("target").value = fleet.target || "";
    byId("protocol").value = fleet.protocol || "relp";
    byId("tls").checked = fleet.tls ?? true;
    byId("peer").value = fleet.peer || "";
  }
  const nodes = Object.keys(setting.effective).sort();
  const chosen = byId("for-node").value;
  byId("for-node").replaceChildren(h("option", { value: "" }, "the whole fleet"), nodes.map((n) => h("option", { value: n }, n)));
  byId("for-node").value = nodes.includes(chosen) ? chosen : "";
  replace("effective", nodes.map((n) => h("tr", {}, h("td", {}, n), h("td", {}, describe(setting.effective[n])),
    h("td", {}, n in setting.overrides ? "yes" : "no"),
    h("td", {}, n in setting.overrides ? button("Follow the fleet", async () => {
      await api("DELETE", `/v1/logging/nodes/${encodeURIComponent(n)}`);
      await refresh();
      return `${n} follows the fleet's setting`;
    }) : ""))));
}

byId("logging").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = { target: form.get("target") || null, protocol: form.get("protocol"), tls: byId("tls").checked };
  if (form.get("peer")) body.peer = form.get("peer");
  if (form.get("node")) body.node = form.get("node");
  try {
    const answer = await api("PUT", "/v1/logging", body);
    say(`Logs of ${answer.node || "the fleet"} go ${describe(answer.setting)}; ${answer.tasks.length} node(s) told.`);
    await refresh();
  } catch (error) {
    say(error.message, "error");
  }
});

start(["nodes"], refresh);
