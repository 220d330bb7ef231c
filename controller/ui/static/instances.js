// Instances: the list with start, stop, delete and migrate; a create form whose user data
// the controller checks (line and reason) before it is sent.
import { all, api, button, byId, h, migrationView, replace, say, start } from "/static/kumo.js";

let migrating = null;  // the id of the migration started from this page
let nodes = [];
let userDataOk = true;

function destinations(instance) {
  return h("select", { "aria-label": `destination for ${instance.name}`, id: `to-${instance.name}` },
    h("option", { value: "" }, "scheduler's choice"),
    nodes.filter((n) => n.id !== instance.node && n.state === "ready").map((n) => h("option", { value: n.id }, n.id)));
}

function actions(instance) {
  const path = `/v1/instances/${encodeURIComponent(instance.name)}`;
  return [
    button("Start", async () => { await api("POST", `${path}/start`, {}); return `starting ${instance.name}`; }, { "data-action": "start" }),
    button("Stop", async () => { await api("POST", `${path}/stop`, {}); return `stopping ${instance.name}`; }, { "data-action": "stop" }),
    button("Delete", async () => {
      if (!window.confirm(`Delete ${instance.name} and its disks?`)) return null;
      await api("DELETE", path);
      return `deleting ${instance.name}`;
    }, { "data-action": "delete", class: "danger" }),
    destinations(instance),
    button("Migrate", async () => {
      const to = byId(`to-${instance.name}`).value || null;
      const answer = await api("POST", `${path}/migrate`, { to });
      migrating = answer.migration.id;
      await showMigration();
      return `migrating ${instance.name}`;
    }, { "data-action": "migrate" }),
  ];
}

async function showMigration() {
  if (migrating) replace("migration", migrationView(await api("GET", `/v1/migrations/${migrating}`)));
}

async function refresh() {
  nodes = await all("/v1/nodes", "nodes");
  const instances = await all("/v1/instances", "instances");
  replace("instances", instances.length ? instances.map((i) => h("tr", { "data-instance": i.name, "data-state": i.state },
    h("td", {}, h("a", { href: `/instances/${encodeURIComponent(i.name)}` }, i.name)), h("td", {}, i.kind),
    h("td", {}, h("a", { href: `/nodes/${encodeURIComponent(i.node)}` }, i.node)),
    h("td", { class: `state ${i.state}` }, i.state), h("td", {}, `${i.vcpus} vCPU, ${i.memory_mib} MiB`),
    h("td", { class: "actions" }, actions(i)))) : h("tr", {}, h("td", { colspan: 6 }, "No instances yet.")));
  const kinds = [...new Set(nodes.filter((n) => n.state === "ready" && !n.drained)
    .flatMap((n) => Object.values(n.plugins).filter((p) => p.available).flatMap((p) => p.kinds || [])))].sort();
  const select = byId("kind");
  const chosen = select.value;
  select.replaceChildren(...kinds.map((k) => h("option", { value: k }, k)));
  if (kinds.includes(chosen)) select.value = chosen;
  await showMigration();
}

let checking = 0;
async function checkUserData() {
  const text = byId("user_data").value;
  const mine = ++checking;
  const answer = await api("POST", "/v1/cloud-config/check", { user_data: text });
  if (mine !== checking) return;  // a newer check is on its way
  userDataOk = answer.valid;
  byId("user_data_check").className = answer.valid ? "" : "error";
  byId("user_data_check").textContent = answer.valid ? (text.trim() ? "User data: valid." : "")
    : `Line ${answer.line ?? "?"}: ${answer.error}`;
  byId("create-submit").disabled = !answer.valid;
}

let timer = null;
byId("user_data").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(checkUserData, 300); });

byId("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    await checkUserData();
    if (!userDataOk) return;
    const body = { name: form.get("name"), kind: form.get("kind"), vcpus: Number(form.get("vcpus")),
      memory_mib: Number(form.get("memory_mib")) };
    if (form.get("image")) body.image = form.get("image");
    if (form.get("user_data").trim()) body.user_data = form.get("user_data");
    const options = JSON.parse(form.get("options") || "{}");
    if (Object.keys(options).length) body.options = options;
    const answer = await api("POST", "/v1/instances", body);
    say(`${answer.instance.name} placed on ${answer.instance.node}`);
  } catch (error) {
    say(error instanceof SyntaxError ? `Options: not JSON (${error.message})` : error.message, "error");
  }
});

start(["instances", "nodes", "migrations"], refresh);
