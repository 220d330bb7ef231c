// One instance: where it runs and why, its console, its tasks, and its migration's progress.
import { all, api, button, byId, h, migrationView, params, replace, start } from "/static/kumo.js";

const name = params();
let migration = new URLSearchParams(location.search).get("migration");

// The destinations: every other node, those the scheduler rejects disabled, with its reason.
function migrateControls(instance, nodes) {
  const mode = (instance.migration || {})["stop-and-copy"] || { possible: false, reason: "unknown" };
  const rejected = mode.rejected || {};
  const chosen = byId("migrate-to") ? byId("migrate-to").value : "";
  replace("migrate-why", mode.possible ? `Possible: ${mode.reason}.` : `Not possible now: ${mode.reason}.`);
  const select = h("select", { id: "migrate-to", "aria-label": "destination" },
    h("option", { value: "" }, "scheduler's choice"),
    nodes.filter((n) => n.id !== instance.node).map((n) => h("option", { value: n.id, disabled: n.id in rejected },
      n.id in rejected ? `${n.id} (rejected)` : n.id)));
  if (chosen && !(chosen in rejected)) select.value = chosen;
  replace("migrate", select, button("Migrate", async () => {
    const answer = await api("POST", `/v1/instances/${encodeURIComponent(name)}/migrate`, { to: select.value || null });
    migration = answer.migration.id;
    replace("migration", migrationView(answer.migration));
    return `migrating ${name} to ${answer.migration.destination}`;
  }, { "data-action": "migrate", disabled: !mode.possible }));
  replace("rejected", Object.entries(rejected).sort().map(([node, why]) => h("li", {}, `${node}: ${why}`)));
}

async function refresh() {
  const path = `/v1/instances/${encodeURIComponent(name)}`;
  const instance = await api("GET", path);
  replace("title", `Instance ${instance.name}`);
  document.title = `${instance.name} · Kumo`;
  const facts = { kind: instance.kind, node: instance.node, state: instance.state, vCPUs: instance.vcpus,
    "memory (MiB)": instance.memory_mib, created: instance.created_at, details: JSON.stringify(instance.details) };
  replace("facts", Object.entries(facts).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  byId("main").dataset.state = instance.state;
  if (!byId("actions").childElementCount) replace("actions", operations());
  migrateControls(instance, await all("/v1/nodes", "nodes"));
  const tasks = (await api("GET", `/v1/tasks?limit=200&node=${encodeURIComponent(instance.node)}`)).tasks
    // Console reads are left out: following the console makes one every few seconds.
    .filter((t) => t.payload && t.payload.name === name && !t.kind.endsWith(".console")).slice(0, 20);
  replace("tasks", tasks.map((t) => h("tr", {}, h("td", {}, t.id), h("td", {}, t.kind), h("td", {}, t.state), h("td", {}, t.error || ""))));
  if (migration) replace("migration", migrationView(await api("GET", `/v1/migrations/${migration}`)));
  await showConsole();
}

// Start, stop, checkpoint (keeping it running) and restore its latest checkpoint: each a
// task on its node, whose end the live stream brings.
function operations() {
  const path = `/v1/instances/${encodeURIComponent(name)}`;
  const task = (operation, body, said) => button(operation[0].toUpperCase() + operation.slice(1), async () => {
    await api("POST", `${path}/${operation}`, body);
    return `${said} ${name}`;
  }, { "data-action": operation });
  return [task("start", {}, "starting"), task("stop", {}, "stopping"),
    task("checkpoint", { leave_running: true }, "checkpointing"), task("restore", {}, "restoring")];
}

// The console is a task on the instance's node (the agent reads the log's tail): queued
// here, shown when the live stream says a task ended and it is this one. Following it reads
// the tail again FOLLOW_EVERY ms after each read ends, only while following is on and the
// page is visible, so a closed or hidden console costs nothing.
const FOLLOW_EVERY = 2000;
let consoleTask = null;  // { id, done }: the read on its way
let following = false;

async function showConsole() {
  if (!consoleTask) return;
  const task = await api("GET", `/v1/tasks/${consoleTask.id}`);
  if (task.state === "succeeded") byId("console").textContent = task.result.log || "(empty)";
  else if (task.state === "failed") byId("console").textContent = `failed: ${task.error}`;
  else return;
  const { done } = consoleTask;
  consoleTask = null;
  done(task.state);
}

async function readConsole() {
  const id = (await api("POST", `/v1/instances/${encodeURIComponent(name)}/console`, {})).task.id;
  const state = await new Promise((done) => { consoleTask = { id, done }; showConsole(); });
  const pre = byId("console");
  pre.scrollTop = pre.scrollHeight;
  return state;
}

let looping = null;  // the one follow loop, while it runs

async function follow() {
  while (following) {
    if (!document.hidden) {
      const state = await readConsole().catch((error) => {
        byId("console").textContent = error.message;
        return "failed";
      });
      if (state !== "succeeded") {
        setFollowing(false);  // what stopped it (a failed read, a deleted instance) stays shown
        return;
      }
    }
    await new Promise((resume) => { setTimeout(resume, FOLLOW_EVERY); });
  }
}

function setFollowing(on) {
  following = on;
  byId("console-follow").setAttribute("aria-pressed", String(on));
}

byId("console-follow").addEventListener("click", () => {
  setFollowing(!following);
  if (!following && consoleTask) {
    // A read whose node never answers would hold the loop: let go of it.
    consoleTask.done("stopped");
    consoleTask = null;
  }
  if (following) {
    if (!byId("console").textContent) byId("console").textContent = "reading...";
    looping ||= follow().finally(() => { looping = null; });
  }
});

start(["instances", "tasks", "migrations"], refresh);
