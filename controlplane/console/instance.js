// An instance's page: state, actions (start, stop, restart, suspend, delete with a
// confirmation), "Open editor", "Open signed in" (a `members` instance's endpoints), HA, sleep
// when idle, replicas, a live merged log, settings and environment (the template's locked values
// shown locked), modules and affinity, who may call the flows' HTTP endpoints and the instance's
// HTTP tokens, its custom hostname and certificate (with its expiry), snapshots, deploys and the
// audit log. What a role may not do is not offered; the API decides either way.
import { api, el, enc, error, session, mayOperate, owns, button, form, field, all, when, table, section, teams } from "./lib.js";

// Draws `build()` into `container` only when `key` changed, so that controls keep their focus
// and what is typed while the page follows the instance live.
function redraw(container, key, build) {
  const k = JSON.stringify(key);
  if (container.dataset.key === k) return;
  container.dataset.key = k;
  container.replaceChildren(...[].concat(build()));
}

// Who may call an instance's flows' HTTP endpoints, as the API names the modes; `/admin` keeps
// its own rules in every mode. Each: the mode, its choice in the form, what it means.
const HTTP_MODES = [
  ["none", "none — anyone", "anyone may call the flows' endpoints"],
  ["tokens", "tokens — this instance's HTTP tokens", "each request needs one of this instance's HTTP tokens, as Authorization: Bearer <token>"],
  ["members", "members — the team's members, signed in", "the team's members, viewers included, and platform admins, signed in"],
];

export async function instancePage(id) {
  const path = "/api/v1/instances/" + enc(id);
  let instance = await api("GET", path);
  await teams();
  const team = instance.team_id;
  const member = mayOperate(team);
  const owner = owns(team);
  const template = instance.template_id ? await api("GET", "/api/v1/templates/" + enc(instance.template_id)) : null;

  const state = el("p", { id: "instance-state", class: "state-line" });
  const links = el("p", { class: "links" });
  const actions = el("div", { id: "instance-actions", class: "actions" });
  const confirm = el("div", { id: "delete-confirm", class: "confirm", hidden: true });
  const replicas = el("tbody", { id: "replicas" });
  const deploys = el("div", { id: "deploys" });
  const modules = el("div", { id: "modules" });
  const snapshots = el("div", { id: "snapshots" });
  const audit = el("div", { id: "audit" });
  const settings = el("div", { id: "settings" });
  const ha = el("div", { id: "ha" });
  const sleep = el("div", { id: "sleep" });
  const httpMode = el("div", { id: "http-mode" });
  const httpTokens = el("div", { id: "http-tokens" });
  const httpShown = el("div", { id: "http-token-shown", role: "status" });
  const customHost = el("div", { id: "custom-hostname" });
  const log = logView(path);

  const root = el("section", { id: "page-instance", "data-instance": instance.name },
    el("p", {}, el("a", { href: "#/", id: "back" }, "All instances")),
    el("h2", { id: "instance-name" }, instance.name),
    state, links, actions, confirm,
    section("Replicas", el("table", {},
      el("thead", {}, el("tr", {}, ...["Replica", "State", "Active", "Pid / port", "Restarts", "Last exit", "Since"].map((h) => el("th", {}, h)))),
      replicas)),
    section("High availability", ha),
    section("Sleep when idle", sleep),
    section("HTTP access", el("div", { id: "http-access" }, httpMode,
      el("p", { class: "muted" }, "With tokens, call the flows with the header Authorization: Bearer <token>, e.g. curl -H 'Authorization: Bearer <token>' " + instance.url + ". The editor, /admin, keeps its own rules in every mode."),
      httpShown, httpTokens, owner ? httpTokenForm() : null)),
    section("Custom hostname", customHost),
    section("Log", log.root),
    section("Deploys", deploys),
    section("Snapshots", snapshots),
    section("Modules", modules),
    section("Settings and environment", settings),
    section("Audit log", audit));

  // --- Actions -------------------------------------------------------------------------------
  function drawActions() {
    const list = [];
    if (member) {
      for (const [action, label] of [["start", "Start"], ["stop", "Stop"], ["restart", "Restart"], ["suspend", "Suspend"]]) {
        list.push(button(label, async () => {
          await api("POST", path + "/actions/" + action);
          await refresh();
        }, { "data-action": action }));
      }
    }
    if (owner) {
      list.push(button("Delete…", async () => { confirm.hidden = false; confirm.querySelector("input").focus(); },
        { "data-action": "delete", class: "danger" }));
    }
    actions.replaceChildren(...list);
    if (!owner) return;
    const typed = el("input", { autocomplete: "off", spellcheck: "false" });
    confirm.replaceChildren(form({ id: "delete-form" }, [
      ...field("Type " + instance.name + " to delete it, its replicas and its snapshots for good", typed),
      el("div", { class: "actions" },
        el("button", { type: "submit", class: "danger" }, "Delete for good"),
        button("Cancel", async () => { confirm.hidden = true; }))], async () => {
      if (typed.value !== instance.name) throw new Error("Type the instance's name, " + instance.name + ", to delete it.");
      await api("DELETE", path);
      location.hash = "#/";
    }));
  }

  function drawLinks() {
    const parts = [el("a", { href: instance.url, target: "_blank", rel: "noopener", id: "instance-url" }, instance.url)];
    if (!instance.ha && member) {
      // The editor is on the instance's own host, which the console's cookie does not reach: a
      // single-use ticket, exchanged by the proxy for a cookie of that host, opens it.
      parts.push(" ", button("Open editor", async () => {
        const t = await api("POST", path + "/editor-ticket");
        window.open(t.url, "_blank", "noopener");
      }, { id: "open-editor" }));
    } else if (instance.ha) {
      parts.push(" ", el("span", { class: "muted" }, "The editor is closed on HA instances: deploy with snapshots and pipelines."));
    }
    if (instance.http_auth === "members") {
      // The flows' endpoints are for the team's members, signed in on the instance's host,
      // which the console's cookie does not reach either: an access ticket opens them there,
      // on its own host or on its custom hostname (a host-only cookie each). Viewers too.
      const open = (host) => async () => {
        const t = await api("POST", path + "/access-ticket" + (host ? "?host=" + enc(host) : ""));
        window.open(t.url, "_blank", "noopener");
      };
      parts.push(" ", button("Open signed in", open(null), { id: "open-signed-in" }));
      if (instance.custom_hostname) {
        parts.push(" ", button("Open signed in at " + instance.custom_hostname, open(instance.custom_hostname), { id: "open-signed-in-custom" }));
      }
    }
    links.replaceChildren(...parts);
  }

  // --- HA ----------------------------------------------------------------------------------
  function drawHa() {
    const h = instance.ha;
    if (!owner) {
      ha.replaceChildren(el("p", {}, h ? h.replicas + " replicas, " + h.mode + (h.mode === "balanced" ? ", affinity " + (h.affinity === false ? "off" : "on") : "") : "Off: one replica, editor open."));
      return;
    }
    const count = el("select", { id: "ha-replicas" },
      el("option", { value: "0" }, "Off (one replica, editor open)"),
      ...[2, 3, 4, 5].map((n) => el("option", { value: String(n) }, n + " replicas")));
    const mode = el("select", { id: "ha-mode" },
      el("option", { value: "balanced" }, "Balanced (every replica serves)"),
      el("option", { value: "standby" }, "Standby (one serves, the others wait)"));
    const affinity = el("input", { type: "checkbox", id: "ha-affinity" });
    count.value = h ? String(h.replicas) : "0";
    mode.value = h ? h.mode : "balanced";
    affinity.checked = !h || h.affinity !== false;
    ha.replaceChildren(form({ id: "ha-form" }, [
      ...field("Replicas", count), ...field("Mode", mode),
      el("label", { class: "check" }, affinity, " Affinity: keep each browser on one replica (dashboards)"),
      el("button", { type: "submit" }, "Apply")], async () => {
      const replicas = Number(count.value);
      if (replicas === 0) await api("DELETE", path + "/ha");
      else await api("PUT", path + "/ha", Object.assign({ replicas, mode: mode.value }, mode.value === "balanced" ? { affinity: affinity.checked } : {}));
      instance = await api("GET", path);
      drawLinks();
      drawSleep();
      await refresh();
    }));
  }

  // --- Sleep -------------------------------------------------------------------------------
  // An instance that sleeps after a quiet while gives its memory back; the next request wakes
  // it. Members set it, in minutes; HA instances stay awake (the API refuses it). The warnings
  // of the change that turned it on (schedules that will not run) stay until the next change.
  let sleepWarnings = [];
  function drawSleep() {
    const after = instance.sleep_after_s;
    const out = [el("p", { id: "sleep-current", "data-sleep-after": after == null ? "off" : String(after) },
      after == null ? "Off: the instance stays awake."
        : "After " + idle(after) + " with no request, no open WebSocket and no MQTT connection, the instance sleeps: its replica stops, and the next request wakes it.")];
    if (sleepWarnings.length) out.push(el("ul", { id: "sleep-warnings", class: "warn" }, ...sleepWarnings.map((w) => el("li", {}, w))));
    if (instance.ha) {
      out.push(el("p", { class: "muted" }, "HA instances stay awake."));
    } else if (member) {
      const minutes = el("input", { id: "sleep-minutes", type: "number", min: "1", max: "43200", required: true });
      minutes.value = after == null ? "15" : String(Math.max(1, Math.round(after / 60)));
      const set = async (sleep_after_s) => {
        instance = await api("PUT", path, { sleep_after_s });
        sleepWarnings = instance.warnings || [];
        drawSleep();
      };
      out.push(form({ id: "sleep-form", class: "inline" }, [
        ...field("Sleep after this many idle minutes", minutes),
        el("div", { class: "actions" },
          el("button", { type: "submit" }, after == null ? "Turn on" : "Apply"),
          after == null ? null : button("Turn off", () => set(null), { id: "sleep-off" }))],
      () => set(Number(minutes.value) * 60)));
    }
    sleep.replaceChildren(...out);
  }

  // --- HTTP access -------------------------------------------------------------------------
  // The mode and the tokens follow the instance live; owners change the mode, create and
  // revoke tokens, the others read. A new token's value is shown once, outside what is redrawn.
  async function drawHttpAccess() {
    const [auth, list] = await Promise.all([api("GET", path + "/http-auth"), all(path + "/http-tokens")]);
    if (instance.http_auth !== auth.mode) {
      instance.http_auth = auth.mode;
      drawLinks();
    }
    redraw(httpMode, auth.mode, () => {
      const explained = (m) => (HTTP_MODES.find(([k]) => k === m) || [m, m, ""])[2];
      const out = [el("p", { id: "http-auth-current", "data-mode": auth.mode }, "Mode: ", el("strong", {}, auth.mode), " — " + explained(auth.mode) + ".")];
      if (owner) {
        const select = el("select", { id: "http-auth-mode" }, ...HTTP_MODES.map(([k, choice]) => el("option", { value: k }, choice)));
        select.value = auth.mode;
        out.push(form({ id: "http-auth-form", class: "inline" }, [...field("Who may call the flows", select), el("button", { type: "submit" }, "Apply")], async () => {
          await api("PUT", path + "/http-auth", { mode: select.value });
          await drawHttpAccess();
        }));
      }
      return out;
    });
    redraw(httpTokens, list, () => list.length ? table(["Token", "Created", "Expires", "Last used"].concat(owner ? [""] : []), list.map((t) =>
      el("tr", { "data-http-token": t.name },
        el("td", {}, t.name), el("td", {}, when(t.created_at)), el("td", {}, t.expires_at ? when(t.expires_at) : "never"),
        el("td", {}, t.last_used_at ? when(t.last_used_at) : "never"),
        owner ? el("td", {}, button("Revoke", async () => {
          await api("DELETE", path + "/http-tokens/" + enc(t.id));
          // A value still on the screen opens nothing any more: not left there.
          if (httpShown.dataset.token === t.id) { httpShown.replaceChildren(); delete httpShown.dataset.token; }
          await drawHttpAccess();
        }, { "aria-label": "Revoke " + t.name })) : null)), { id: "http-tokens-table" }) : el("p", { class: "muted" }, "No HTTP token."));
  }

  function httpTokenForm() {
    const name = el("input", { id: "http-token-name", required: true, maxlength: "100", autocomplete: "off" });
    const days = el("input", { id: "http-token-days", type: "number", min: "1", placeholder: "never" });
    return form({ id: "http-token-form", class: "inline" }, [...field("Token name", name), ...field("Expires in (days)", days),
      el("button", { type: "submit" }, "Create an HTTP token")], async () => {
      const body = { name: name.value };
      if (days.value) body.expires_at = Date.now() + Number(days.value) * 86400000;
      const t = await api("POST", path + "/http-tokens", body);
      name.value = ""; days.value = "";
      httpShown.dataset.token = t.id;
      httpShown.replaceChildren(el("p", {}, "The HTTP token ", el("strong", {}, t.name), ", shown this once: ", el("code", { id: "http-token-value" }, t.token_value)));
      await drawHttpAccess();
    });
  }

  // --- Custom hostname ---------------------------------------------------------------------
  // A host of the team's own domain, routed like the instance's own, with a certificate the
  // proxies serve for it over HTTPS when one is uploaded. Read where the instance's view names
  // one (no request that answers 404); owners set and remove it, the others read it. The key
  // goes to the API and is never shown back: its field always starts empty.
  async function drawCustomHostname() {
    let current = null;
    if (instance.custom_hostname) {
      try { current = await api("GET", path + "/custom-hostname"); } catch (e) { if (e.status !== 404) throw e; }
    }
    showCustomHostname(current);
  }

  function showCustomHostname(current) {
    const hostname = current ? current.hostname : null;
    if (instance.custom_hostname !== hostname) {
      instance.custom_hostname = hostname;
      drawLinks();
    }
    redraw(customHost, current, () => {
      const out = [current
        ? el("p", { id: "custom-hostname-current", "data-hostname": current.hostname, "data-certificate": String(current.has_certificate) },
          el("a", { href: current.url, target: "_blank", rel: "noopener", id: "custom-hostname-url" }, current.url), " — ",
          current.has_certificate ? "with its own certificate for HTTPS" + (current.certificate_expires_at ? ", valid until " + when(current.certificate_expires_at) + "." : ".")
            : "no certificate of its own: over HTTPS the proxies serve theirs, which do not cover it.")
        : el("p", { id: "custom-hostname-current", class: "muted" }, "None: the instance is served at " + instance.url + " only.")];
      const left = current && current.certificate_expires_at ? current.certificate_expires_at - Date.now() : Infinity;
      if (left < 14 * 86400000) {
        out.push(el("p", { id: "custom-hostname-expiry", class: "warn" }, left <= 0
          ? "Its certificate has expired: browsers refuse it. Upload a renewed one."
          : "Its certificate expires in " + Math.ceil(left / 86400000) + " days: upload a renewed one."));
      }
      if (current) out.push(el("p", { class: "muted" }, "Point the hostname's DNS at the proxies, as for " + instance.url + "."));
      if (owner) out.push(customHostnameForm(current));
      return out;
    });
  }

  function customHostnameForm(current) {
    const hostname = el("input", { id: "custom-hostname-input", required: true, maxlength: "253", autocomplete: "off", spellcheck: "false", placeholder: "flows.example.org" });
    hostname.value = current ? current.hostname : "";
    const certificate = el("textarea", { id: "custom-hostname-certificate", rows: "4", spellcheck: "false", placeholder: "-----BEGIN CERTIFICATE-----" });
    const key = el("textarea", { id: "custom-hostname-key", rows: "4", spellcheck: "false", autocomplete: "off", placeholder: "-----BEGIN PRIVATE KEY-----" });
    return form({ id: "custom-hostname-form" }, [
      ...field("Hostname", hostname),
      ...field("Certificate (PEM chain, leaf first; optional, with its key)", certificate),
      ...field("Private key (PEM; stored encrypted, never shown again)", key),
      el("p", { class: "muted" }, "Without a certificate, the same hostname keeps the one it has, and a new hostname has none."),
      el("div", { class: "actions" },
        el("button", { type: "submit" }, "Save"),
        current ? button("Remove", async () => {
          await api("DELETE", path + "/custom-hostname");
          showCustomHostname(null);
        }, { id: "custom-hostname-remove", class: "danger" }) : null)], async () => {
      const body = { hostname: hostname.value.trim() };
      // Each only when given, so that the API names the one missing.
      if (certificate.value.trim()) body.certificate = certificate.value;
      if (key.value.trim()) body.key = key.value;
      const saved = await api("PUT", path + "/custom-hostname", body);
      certificate.value = "";
      key.value = "";
      showCustomHostname(saved);
    });
  }

  // --- Settings and environment ----------------------------------------------------------------
  function drawSettings() {
    const lockedEnv = (k) => !!(template && template.env[k] && template.env[k].locked);
    const lockedSetting = (k) => !!template && template.policy.settings[k] !== true;
    const effective = Object.entries(instance.effective_settings || {});
    const settingsRows = effective.map(([k, v]) => el("tr", { "data-setting": k },
      el("td", {}, k), el("td", {}, el("code", {}, JSON.stringify(v))),
      el("td", {}, lockedSetting(k) ? el("span", { class: "badge locked" }, "locked by template") : (k in (instance.settings || {}) ? "this instance" : "template"))));
    const envRows = Object.entries(instance.effective_env || {}).map(([k, v]) => {
      const secret = typeof v === "object";
      return el("tr", { "data-env": k },
        el("td", {}, k), el("td", {}, secret ? el("span", { class: "muted" }, "secret (never shown)") : v),
        el("td", {}, lockedEnv(k) ? el("span", { class: "badge locked" }, "locked by template") : (k in instance.env ? "this instance" : "template")));
    });
    const parts = [
      el("h4", {}, "Settings"),
      effective.length ? table(["Setting", "Value", "Set by"], settingsRows, { id: "settings-table" }) : el("p", { class: "muted" }, "Node-RED's defaults."),
      el("h4", {}, "Environment"),
      envRows.length ? table(["Variable", "Value", "Set by"], envRows, { id: "env-table" }) : el("p", { class: "muted" }, "No variable."),
    ];
    if (instance.not_applied && instance.not_applied.length) {
      parts.push(el("p", { class: "warn" }, "Not applied: " + instance.not_applied.map((r) => r.field + " (" + r.message + ")").join("; ")));
    }
    if (member) {
      const overrides = el("textarea", { id: "settings-json", rows: "4", spellcheck: "false" }, JSON.stringify(instance.settings || {}, null, 2));
      parts.push(form({ id: "settings-form" }, [
        ...field("This instance's settings (JSON object; replaces the current ones)", overrides),
        el("button", { type: "submit" }, "Save settings")], async () => {
        let value;
        try { value = JSON.parse(overrides.value || "{}"); } catch (e) { throw new Error("The settings are not JSON: " + e.message); }
        instance = await api("PUT", path, { settings: value });
        drawSettings();
      }));
      parts.push(envForm());
    }
    settings.replaceChildren(...parts);
  }

  // The instance's own variables, one row each: a secret keeps its stored value unless a new
  // one is typed; a variable the template locks is not offered.
  function envForm() {
    const rows = el("tbody", {});
    const addRow = (name, value, secret, stored) => {
      const n = el("input", { value: name, "aria-label": "Variable name", spellcheck: "false" });
      const v = el("input", { value: stored ? "" : value, "aria-label": "Value", placeholder: stored ? "unchanged (secret)" : "", type: secret ? "password" : "text" });
      const s = el("input", { type: "checkbox", "aria-label": "Secret" });
      s.checked = secret;
      // A secret is typed as a password: not shown on the screen either.
      s.addEventListener("change", () => { v.type = s.checked ? "password" : "text"; });
      const tr = el("tr", { class: "env-row" }, el("td", {}, n), el("td", {}, v), el("td", {}, s), el("td", {}, button("Remove", async () => tr.remove())));
      tr.read = () => {
        const name = n.value.trim();
        if (!name) return null;
        if (s.checked) return [name, v.value === "" && stored ? { secret: true } : { value: v.value, secret: true }];
        return [name, v.value];
      };
      rows.append(tr);
    };
    for (const [k, v] of Object.entries(instance.env || {})) {
      if (typeof v === "object") addRow(k, "", true, true); else addRow(k, v, false, false);
    }
    return form({ id: "env-form" }, [
      el("p", { class: "label" }, "This instance's variables"),
      el("table", {}, el("thead", {}, el("tr", {}, ...["Name", "Value", "Secret", ""].map((h) => el("th", {}, h)))), rows),
      el("div", { class: "actions" },
        button("Add a variable", async () => addRow("", "", false, false)),
        el("button", { type: "submit" }, "Save variables"))], async () => {
      const env = {};
      for (const tr of rows.children) {
        const pair = tr.read();
        if (pair) env[pair[0]] = pair[1];
      }
      instance = await api("PUT", path, { env });
      drawSettings();
    });
  }

  // --- Modules -------------------------------------------------------------------------------
  async function drawModules() {
    const m = (await api("GET", path + "/modules")).modules;
    redraw(modules, m, () => {
      const names = Object.keys(m);
      const rows = names.map((name) => el("tr", { "data-module": name },
        el("td", {}, name), el("td", {}, m[name].requested),
        el("td", { class: "state" }, m[name].installed ? "installed " + m[name].installed : "installing"),
        el("td", {}, member ? button("Remove", async () => {
          const next = {};
          for (const n of names) if (n !== name) next[n] = m[n].requested;
          await api("PUT", path + "/modules", { modules: next });
          await drawModules();
        }) : "")));
      const out = [names.length ? table(["Module", "Requested", "State", ""], rows, { id: "modules-table" }) : el("p", { class: "muted" }, "No module beyond Node-RED's own.")];
      if (member) {
        const name = el("input", { id: "module-name", spellcheck: "false", placeholder: "node-red-contrib-…" });
        const version = el("input", { id: "module-version", value: "latest" });
        out.push(form({ id: "module-form", class: "inline" }, [...field("Module", name), ...field("Version", version), el("button", { type: "submit" }, "Add")], async () => {
          const next = {};
          for (const n of names) next[n] = m[n].requested;
          next[name.value.trim()] = version.value.trim() || "latest";
          await api("PUT", path + "/modules", { modules: next });
          await drawModules();
        }));
      }
      return out;
    });
  }

  // --- Snapshots and deploys -----------------------------------------------------------------
  async function drawSnapshots() {
    const list = (await all(path + "/snapshots")).reverse();
    const rows = list.map((s) => el("tr", { "data-snapshot": s.id },
      el("td", {}, s.name), el("td", {}, s.description || ""), el("td", {}, s.author), el("td", {}, when(s.created_at)),
      el("td", { class: "actions" },
        member ? button("Roll back", async () => {
          await api("POST", path + "/actions/rollback", { snapshot_id: s.id });
          await refresh();
        }, { "data-rollback": s.id }) : null,
        member ? button("Export", async () => exportSnapshot(s)) : null,
        owner ? button("Delete", async () => { await api("DELETE", "/api/v1/snapshots/" + enc(s.id)); await drawSnapshots(); }) : null)));
    const out = [list.length ? table(["Name", "Description", "Author", "Taken", ""], rows, { id: "snapshots-table" }) : el("p", { class: "muted" }, "No snapshot yet.")];
    if (member) {
      const name = el("input", { id: "snapshot-name", required: true });
      const description = el("input", { id: "snapshot-description" });
      out.push(form({ id: "snapshot-form", class: "inline" }, [...field("Name", name), ...field("Description", description), el("button", { type: "submit" }, "Take a snapshot")], async () => {
        await api("POST", path + "/snapshots", { name: name.value, description: description.value });
        name.value = ""; description.value = "";
        await drawSnapshots();
      }));
    }
    snapshots.replaceChildren(...out);
  }

  // An export is encrypted with a secret the user chooses, then saved as a file.
  function exportSnapshot(s) {
    const secret = el("input", { type: "password", autocomplete: "new-password", id: "export-secret" });
    const box = el("div", { class: "confirm" });
    box.append(form({ id: "export-form" }, [
      ...field("A secret to encrypt " + s.name + "'s credentials with (needed to import it)", secret),
      el("div", { class: "actions" }, el("button", { type: "submit" }, "Export"), button("Cancel", async () => box.remove()))], async () => {
      const doc = await api("POST", "/api/v1/snapshots/" + enc(s.id) + "/export", { credential_secret: secret.value });
      const a = el("a", { href: URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" })), download: instance.name + "-" + s.name + ".json" });
      a.click();
      URL.revokeObjectURL(a.href);
      box.remove();
    }));
    snapshots.prepend(box);
    secret.focus();
  }

  async function drawDeploys() {
    const list = (await api("GET", path + "/deployments?limit=5")).items || [];
    redraw(deploys, list, () => list.length ? list.map((d) => el("div", { class: "deploy", "data-deployment": d.id, "data-status": d.status },
      el("p", {}, el("strong", {}, d.status), " ", when(d.started_at), d.error ? " — " + d.error : ""),
      el("ol", { class: "progress" }, ...d.replicas.map((r) => el("li", { class: "step " + r.status }, r.id + ": " + r.status + (r.error ? " (" + r.error + ")" : "")))))) : el("p", { class: "muted" }, "No deploy yet."));
  }

  // --- Audit ---------------------------------------------------------------------------------
  async function drawAudit() {
    if (!member) { audit.replaceChildren(el("p", { class: "muted" }, "Members and owners read the audit log.")); return; }
    const entries = (await api("GET", path + "/audit-log?limit=20")).items;
    redraw(audit, entries.map((e) => e.id), () => entries.length ? table(["When", "Who", "What"], entries.map((e) =>
      el("tr", {}, el("td", {}, when(e.ts)), el("td", {}, e.actor), el("td", {}, e.event)))) : el("p", { class: "muted" }, "Nothing yet."));
  }

  // --- Live parts ----------------------------------------------------------------------------
  async function refresh() {
    const status = (await api("GET", path + "/status")).observed;
    state.textContent = status.summary + (status.reason ? " — " + status.reason : "");
    state.dataset.state = status.state;
    replicas.replaceChildren(...(status.replicas || []).map((r) => el("tr", { "data-replica": r.id },
      el("td", {}, el("span", { class: "dot " + r.state }), " ", r.id),
      el("td", { class: "state" }, r.state),
      el("td", {}, r.active ? "yes" : "no"),
      el("td", {}, (r.pid || "-") + " / " + (r.port || "-")),
      el("td", {}, String(r.restarts)),
      el("td", {}, r.last_exit || ""),
      el("td", {}, when(r.since)))));
    log.replicas(status.replicas || []);
    await Promise.all([log.poll(), drawDeploys(), drawModules(), drawAudit(), drawHttpAccess()]);
  }

  drawActions();
  drawLinks();
  drawHa();
  drawSleep();
  drawSettings();
  await Promise.all([refresh(), drawSnapshots(), drawCustomHostname()]);
  return { root, refresh, leave: () => {} };
}

// `s` seconds, in the largest unit that says it exactly.
function idle(s) {
  const unit = (n, word) => n + " " + word + (n === 1 ? "" : "s");
  if (s % 86400 === 0) return unit(s / 86400, "day");
  if (s % 3600 === 0) return unit(s / 3600, "hour");
  if (s % 60 === 0) return unit(s / 60, "minute");
  return unit(s, "second");
}

// The live log: newest entries first shown, new ones appended while following, older ones
// loaded when scrolled to the top, one replica or all.
function logView(path) {
  const filter = el("select", { id: "log-replica" }, el("option", { value: "" }, "All replicas"));
  const follow = el("button", { type: "button", id: "log-follow", "aria-pressed": "true" }, "Pause");
  const lines = el("div", { id: "log", class: "log", role: "log", tabindex: "0", "aria-label": "Log" });
  const note = el("span", { class: "muted", id: "log-note" });
  let next = null, previous = null, following = true, loading = false;
  // `epoch` counts the filter's changes: a page asked for before the last one is dropped.
  // `olderWanted`: the top was reached while a page was loading; older entries come after it.
  let epoch = 0, olderWanted = false;
  // Whether the view keeps to the newest line: until the user scrolls up from the end.
  let pinned = true;

  const line = (e) => el("div", { class: "line level-" + e.level, "data-src": e.src, "data-seq": String(e.seq) },
    el("span", { class: "ts" }, new Date(e.ts).toLocaleTimeString()), el("span", { class: "src" }, e.src), String(e.msg));
  const query = (cursor, limit) => path + "/logs?limit=" + limit + (filter.value ? "&replica=" + enc(filter.value) : "") + (cursor ? "&cursor=" + enc(cursor) : "");

  // New entries while following; `first` loads the first page even when paused (a new filter).
  async function poll(first) {
    if ((!following && !first) || loading) return;
    const mine = epoch;
    loading = true;
    try {
      const page = await api("GET", query(next, next ? 500 : 200));
      // Paused or filtered meanwhile: not shown, and `next` stays, so Follow brings them.
      if (mine !== epoch || (!following && !first)) return;
      if (next === null) previous = page.meta.previous_cursor || null;
      next = page.meta.next_cursor;
      lines.append(...page.log.map(line));
      while (lines.childElementCount > 5000) { lines.firstChild.remove(); previous = "b" + lines.firstChild.dataset.seq; }
      if (pinned) lines.scrollTop = lines.scrollHeight;
    } finally {
      if (mine === epoch) done();
    }
  }

  // Ends a load; a scroll to the top that came during it is served now (at the top, no scroll
  // event would come again).
  function done() {
    loading = false;
    if (olderWanted) { olderWanted = false; older(); }
  }

  async function older() {
    if (!previous) return;
    if (loading) { olderWanted = true; return; }
    const mine = epoch;
    loading = true;
    try {
      const page = await api("GET", query(previous, 200));
      if (mine !== epoch) return;
      previous = page.meta.previous_cursor || null;
      const before = lines.scrollHeight;
      lines.prepend(...page.log.map(line));
      lines.scrollTop += lines.scrollHeight - before;
      note.textContent = previous ? "" : "The oldest entry kept is shown.";
    } catch (e) { error(e.message); } finally {
      if (mine === epoch) done();
    }
  }

  function reset() {
    epoch++;
    next = null; previous = null; loading = false; olderWanted = false; pinned = true; note.textContent = "";
    lines.replaceChildren();
    poll(true).catch((e) => error(e.message));
  }

  filter.addEventListener("change", reset);
  follow.addEventListener("click", () => {
    following = !following;
    follow.textContent = following ? "Pause" : "Follow";
    follow.setAttribute("aria-pressed", String(following));
    if (following) poll().catch((e) => error(e.message));
  });
  lines.addEventListener("scroll", () => {
    pinned = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 4;
    if (lines.scrollTop < 40) older();
  });
  // The first page arrives before the page is on the screen, where nothing scrolls: the view
  // goes to the end once it has a size (and keeps there when the window is resized).
  new ResizeObserver(() => { if (pinned) lines.scrollTop = lines.scrollHeight; }).observe(lines);

  return {
    root: el("div", {}, el("div", { class: "toolbar" }, ...field("Replica", filter), follow, note), lines),
    poll,
    replicas(list) {
      for (const r of list) {
        if (![...filter.options].some((o) => o.value === r.id)) filter.append(el("option", { value: r.id }, r.id));
      }
    },
  };
}
