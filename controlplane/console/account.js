// The user's own account (password, personal access tokens) and the admin area for platform
// admins (users: create, reset a password, disable and enable; stacks; templates).
import { api, el, enc, error, session, button, form, field, all, when, table, section } from "./lib.js";

export async function accountPage() {
  const tokens = el("div", { id: "tokens" });
  const shown = el("div", { id: "token-shown", role: "status" });

  async function drawTokens() {
    const list = await all("/api/v1/user/tokens");
    tokens.replaceChildren(list.length ? table(["Name", "Created", "Expires", "Last used", ""], list.map((t) =>
      el("tr", { "data-token": t.name }, el("td", {}, t.name), el("td", {}, when(t.created_at)), el("td", {}, t.expires_at ? when(t.expires_at) : "never"),
        el("td", {}, when(t.last_used_at)),
        el("td", {}, button("Revoke", async () => { await api("DELETE", "/api/v1/user/tokens/" + enc(t.id)); await drawTokens(); }))))) : el("p", { class: "muted" }, "No token."));
  }

  const current = el("input", { id: "password-current", type: "password", autocomplete: "current-password" });
  const next = el("input", { id: "password-new", type: "password", autocomplete: "new-password", minlength: "8", required: true });
  const passwordForm = form({ id: "password-form" }, [
    ...field("Current password", current), ...field("New password (8 characters or more)", next),
    el("button", { type: "submit" }, "Change the password")], async () => {
    await api("PUT", "/api/v1/user/password", { current: current.value, new: next.value });
    // A password change ends every session, this one too.
    current.value = ""; next.value = "";
    location.reload();
  });

  const name = el("input", { id: "token-name", required: true });
  const days = el("input", { id: "token-days", type: "number", min: "1", placeholder: "never" });
  const tokenForm = form({ id: "token-form", class: "inline" }, [...field("Name", name), ...field("Expires in (days)", days), el("button", { type: "submit" }, "Create a token")], async () => {
    const body = { name: name.value };
    if (days.value) body.expires_at = Date.now() + Number(days.value) * 86400000;
    const t = await api("POST", "/api/v1/user/tokens", body);
    name.value = ""; days.value = "";
    shown.replaceChildren(el("p", {}, "The token ", el("strong", {}, t.name), ", shown this once: ", el("code", { id: "token-value" }, t.token_value)));
    await drawTokens();
  });

  const root = el("section", { id: "page-account" }, el("h2", {}, "Account: " + session.me.username),
    section("Password", passwordForm),
    section("Personal access tokens", el("p", { class: "muted" }, "For the API and scripts: Authorization: Bearer <token>."), shown, tokens, tokenForm));
  await drawTokens();
  return { root };
}

export async function adminPage() {
  if (!session.me.admin) throw new Error("The admin area is for platform admins.");
  const users = el("div", { id: "users" });
  const stacks = el("div", { id: "stacks" });
  const templates = el("div", { id: "templates" });

  async function drawUsers() {
    const list = await all("/api/v1/users");
    users.replaceChildren(table(["User", "Admin", "State", ""], list.map((u) => {
      const reset = el("input", { type: "password", autocomplete: "new-password", "aria-label": "New password for " + u.username, placeholder: "new password", minlength: "8" });
      return el("tr", { "data-user": u.username },
        el("td", {}, u.username), el("td", {}, u.admin ? "yes" : "no"), el("td", { class: "state" }, u.disabled ? "disabled" : "enabled"),
        el("td", { class: "actions" },
          form({ class: "inline" }, [reset, el("button", { type: "submit" }, "Reset password")], async () => {
            await api("PUT", "/api/v1/users/" + enc(u.id), { password: reset.value });
            reset.value = "";
            // Said where it was asked: the password is set and the user's sessions ended.
            reset.placeholder = "reset; " + u.username + " was signed out";
          }),
          button(u.disabled ? "Enable" : "Disable", async () => {
            await api("PUT", "/api/v1/users/" + enc(u.id), { disabled: !u.disabled });
            await drawUsers();
          }, { "data-toggle": u.username }),
          button(u.admin ? "Revoke admin" : "Make admin", async () => {
            await api("PUT", "/api/v1/users/" + enc(u.id), { admin: !u.admin });
            await drawUsers();
          })));
    })));
  }

  async function drawStacks() {
    const list = await all("/api/v1/stacks");
    stacks.replaceChildren(list.length ? table(["Stack", "Node-RED", "Memory", "Replaced by"], list.map((s) =>
      el("tr", { "data-stack": s.name }, el("td", {}, s.name), el("td", {}, s.nodered_version), el("td", {}, s.memory_mb + " MiB"), el("td", {}, s.replaced_by || "")))) : el("p", { class: "muted" }, "No stack."));
  }

  async function drawTemplates() {
    const list = await all("/api/v1/templates");
    templates.replaceChildren(list.length ? table(["Template", "Settings", "Variables", "Modules"], list.map((t) =>
      el("tr", { "data-template": t.name }, el("td", {}, t.name), el("td", {}, Object.keys(t.settings).join(", ")),
        el("td", {}, Object.entries(t.env).map(([k, v]) => k + (v.locked ? " (locked)" : "")).join(", ")),
        el("td", {}, Object.keys(t.modules).join(", "))))) : el("p", { class: "muted" }, "No template."));
  }

  const username = el("input", { id: "user-username", required: true, autocomplete: "off" });
  const password = el("input", { id: "user-password", type: "password", autocomplete: "new-password", minlength: "8", required: true });
  const admin = el("input", { id: "user-admin", type: "checkbox" });
  const userForm = form({ id: "user-form", class: "inline" }, [...field("Username", username), ...field("Password", password),
    el("label", { class: "check" }, admin, " Platform admin"), el("button", { type: "submit" }, "Create the user")], async () => {
    await api("POST", "/api/v1/users", { username: username.value, password: password.value, admin: admin.checked });
    username.value = ""; password.value = ""; admin.checked = false;
    await drawUsers();
  });

  const stackName = el("input", { id: "stack-name", required: true });
  const version = el("input", { id: "stack-version", required: true, placeholder: "4.1.2" });
  const memory = el("input", { id: "stack-memory", type: "number", min: "64", placeholder: "default" });
  const stackForm = form({ id: "stack-form", class: "inline" }, [...field("Name", stackName), ...field("Node-RED version", version), ...field("Memory (MiB)", memory),
    el("button", { type: "submit" }, "Add the stack")], async () => {
    const body = { name: stackName.value, nodered_version: version.value };
    if (memory.value) body.memory_mb = Number(memory.value);
    await api("POST", "/api/v1/stacks", body);
    stackName.value = ""; version.value = ""; memory.value = "";
    await drawStacks();
  });

  // Templates are JSON documents: one textarea per part, checked by the API.
  const tplName = el("input", { id: "template-name", required: true });
  const parts = {};
  for (const [k, example] of [["settings", "{}"], ["env", "{}"], ["modules", "{}"], ["policy", '{"settings": {}, "modules": {"allow": [], "deny": []}}']]) {
    parts[k] = el("textarea", { id: "template-" + k, rows: "2", spellcheck: "false" }, example);
  }
  const templateForm = form({ id: "template-form" }, [...field("Name", tplName),
    ...field("Settings (JSON)", parts.settings), ...field('Environment (JSON: {"NAME": {"value": "…", "locked": true}})', parts.env),
    ...field('Modules (JSON: {"node-red-contrib-…": "1.2.3"})', parts.modules), ...field("Policy (JSON)", parts.policy),
    el("button", { type: "submit" }, "Create the template")], async () => {
    const body = { name: tplName.value };
    for (const [k, area] of Object.entries(parts)) {
      try { body[k] = JSON.parse(area.value || "{}"); } catch (e) { throw new Error(k + " is not JSON: " + e.message); }
    }
    await api("POST", "/api/v1/templates", body);
    tplName.value = "";
    await drawTemplates();
  });

  const root = el("section", { id: "page-admin" }, el("h2", {}, "Admin"),
    section("Users", users, userForm),
    section("Stacks", stacks, stackForm),
    section("Templates", templates, templateForm));
  await Promise.all([drawUsers(), drawStacks(), drawTemplates()]);
  error("");
  return { root };
}
