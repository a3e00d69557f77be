// Create an instance: its name is checked as it is typed, by the API's own rules and words
// (GET /api/v1/instance-names/{name}); then application, stack, template and HA.
import { api, el, enc, owns, form, field, all, teams } from "./lib.js";

export async function createPage() {
  const ts = (await teams()).filter((t) => owns(t.id));
  const apps = [];
  for (const t of ts) for (const a of await all("/api/v1/teams/" + enc(t.id) + "/applications")) apps.push([t, a]);
  const stacks = await all("/api/v1/stacks");
  const templates = await all("/api/v1/templates");

  const name = el("input", { id: "new-name", required: true, autocomplete: "off", spellcheck: "false", "aria-describedby": "new-name-check" });
  const check = el("p", { id: "new-name-check", class: "muted", "aria-live": "polite" });
  const app = el("select", { id: "new-application", required: true }, ...apps.map(([t, a]) => el("option", { value: a.id }, t.name + " / " + a.name)));
  const stack = el("select", { id: "new-stack", required: true }, ...stacks.filter((s) => !s.replaced_by).map((s) => el("option", { value: s.id }, s.name + " (Node-RED " + s.nodered_version + ")")));
  const template = el("select", { id: "new-template" }, el("option", { value: "" }, "None"), ...templates.map((t) => el("option", { value: t.id }, t.name)));
  const ha = el("select", { id: "new-ha" }, el("option", { value: "0" }, "Off (one replica, editor open)"), ...[2, 3, 4, 5].map((n) => el("option", { value: String(n) }, n + " replicas, balanced")));

  // The newest answer wins: an older one arriving late is dropped.
  let asked = 0;
  name.addEventListener("input", async () => {
    const n = name.value;
    const mine = ++asked;
    if (!n) { check.textContent = ""; name.removeAttribute("aria-invalid"); return; }
    try {
      const r = await api("GET", "/api/v1/instance-names/" + enc(n));
      if (mine !== asked) return;
      check.textContent = r.available ? n + " is free." : r.message;
      check.className = r.available ? "ok" : "warn";
      if (r.available) name.removeAttribute("aria-invalid"); else name.setAttribute("aria-invalid", "true");
    } catch (e) { if (mine === asked) { check.textContent = e.message; check.className = "warn"; } }
  });

  const body = apps.length
    ? form({ id: "create-form" }, [...field("Name", name), check, ...field("Application", app), ...field("Stack", stack), ...field("Template", template), ...field("High availability", ha),
      el("button", { type: "submit" }, "Create")], async () => {
      const req = { name: name.value, application_id: app.value, stack_id: stack.value };
      if (template.value) req.template_id = template.value;
      if (ha.value !== "0") req.ha = { replicas: Number(ha.value), mode: "balanced" };
      const i = await api("POST", "/api/v1/instances", req);
      location.hash = "#/instances/" + enc(i.id);
    })
    : el("p", { class: "muted" }, "Instances are created by a team's owners, in an application. ", el("a", { href: "#/teams" }, "Teams"), ".");
  return { root: el("section", { id: "page-new" }, el("h2", {}, "New instance"), body) };
}
