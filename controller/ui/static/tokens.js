// Join tokens: create one and copy the command that joins a new node with it.
import { api, byId, h, replace, say, start } from "/static/kumo.js";

byId("token").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const answer = await api("POST", "/v1/tokens", { ttl_seconds: Number(form.get("minutes")) * 60, uses: Number(form.get("uses")) });
    const command = `kumo-agent join --token ${answer.join}`;
    const copy = h("button", { type: "button", onclick: async () => {
      await navigator.clipboard.writeText(command);
      say("The join command is copied.");
    } }, "Copy");
    replace("joined", h("h2", {}, "On the new node, run"),
      h("pre", { id: "join-command", tabindex: 0 }, command), copy,
      h("p", {}, `Valid until ${answer.expires_at} for ${answer.uses} node(s).`));
  } catch (error) {
    say(error.message, "error");
  }
});

start([], async () => {});
