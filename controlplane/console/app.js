// Tandem's console, first part: first run, sign in and out, every instance of the user's teams
// with its state and a dot per replica, and an instance's page (actions for members and owners,
// its replicas, its merged log with a replica filter), kept up to date by polling the API every
// 2 s.
// It talks to the API with the session cookie (SameSite=Lax; writes carry Origin, which the
// API checks). Text goes into the page with textContent only: nothing from the API is ever
// parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function show(id) {
  for (const s of ["setup", "signin", "teams", "instance"]) $(s).hidden = s !== id;
}

// What the signed-in user is, and its role in each team (what the console offers; the API
// decides).
let me = null;
const roles = {};
// The instance page open, if any.
let open = null;

function mayOperate(teamId) {
  return (me && me.admin) || roles[teamId] === "member" || roles[teamId] === "owner";
}

function owns(teamId) {
  return (me && me.admin) || roles[teamId] === "owner";
}

function error(message) {
  const e = $("error");
  e.textContent = message || "";
  e.hidden = !message;
}

async function api(method, path, body, headers) {
  const init = { method, headers: Object.assign({}, headers), credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new Error("Tandem cannot be reached; retrying.");
  }
  const text = await res.text();
  const json = text ? JSON.parse(text) : null;
  if (!res.ok) {
    const err = new Error((json && json.error && json.error.message) || res.statusText);
    err.status = res.status;
    throw err;
  }
  return json;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function all(path) {
  let items = [], cursor = "";
  for (;;) {
    const page = await api("GET", path + (path.includes("?") ? "&" : "?") + "limit=500" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    items = items.concat(page.items);
    if (!page.next_cursor) return items;
    cursor = page.next_cursor;
  }
}

let polling = null;

async function render() {
  const teams = await all("/api/v1/teams");
  const list = el("div");
  for (const team of teams) {
    const members = await all("/api/v1/teams/" + encodeURIComponent(team.id) + "/members");
    const mine = members.find((m) => me && m.user_id === me.id);
    roles[team.id] = mine ? mine.role : null;
    const instances = await all("/api/v1/teams/" + encodeURIComponent(team.id) + "/instances");
    const rows = el("tbody");
    for (const i of instances) {
      const status = (await api("GET", "/api/v1/instances/" + encodeURIComponent(i.id) + "/status")).observed;
      const dots = el("span", { class: "dots", "aria-label": status.summary });
      for (const r of status.replicas || []) {
        dots.append(el("span", { class: "dot " + r.state, title: r.id + ": " + r.state, "data-replica": r.id }));
      }
      const link = el("a", { href: i.url }, i.url);
      const name = el("button", { type: "button", class: "link", "data-open": i.id }, i.name);
      name.addEventListener("click", () => openInstance(i, team.id));
      rows.append(el("tr", { "data-instance": i.name },
        el("td", {}, name),
        el("td", { class: "state" }, status.summary + (status.reason ? " — " + status.reason : "")),
        el("td", {}, dots),
        el("td", {}, link)));
    }
    const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Instance"), el("th", {}, "State"), el("th", {}, "Replicas"), el("th", {}, "URL"))), rows);
    list.append(el("div", { class: "team" }, el("h3", {}, team.name), instances.length ? table : el("p", { class: "muted" }, "No instance yet.")));
  }
  if (!teams.length) list.append(el("p", { class: "muted" }, "You are in no team yet."));
  $("team-list").replaceChildren(list);
}

async function renderInstance() {
  const i = open.instance;
  const status = (await api("GET", "/api/v1/instances/" + encodeURIComponent(i.id) + "/status")).observed;
  $("instance-name").textContent = i.name;
  $("instance-state").textContent = status.summary + (status.reason ? " — " + status.reason : "");
  const rows = [];
  for (const r of status.replicas || []) {
    rows.push(el("tr", { "data-replica": r.id },
      el("td", {}, el("span", { class: "dot " + r.state }), " ", r.id),
      el("td", { class: "state" }, r.state),
      el("td", {}, r.active ? "yes" : "no"),
      el("td", {}, (r.pid || "-") + " / " + (r.port || "-")),
      el("td", {}, String(r.restarts)),
      el("td", {}, r.last_exit || "")));
  }
  $("replicas").replaceChildren(...rows);
  const select = $("log-replica");
  for (const r of status.replicas || []) {
    if (![...select.options].some((o) => o.value === r.id)) select.append(el("option", { value: r.id }, r.id));
  }
  const filter = select.value ? "&replica=" + encodeURIComponent(select.value) : "";
  const page = await api("GET", "/api/v1/instances/" + encodeURIComponent(i.id) + "/logs?limit=200" + filter);
  const log = $("log");
  const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.replaceChildren(...page.log.map((e) => el("div", { class: "line level-" + e.level, "data-src": e.src },
    el("span", { class: "src" }, e.src), String(e.msg))));
  if (follow) log.scrollTop = log.scrollHeight;
}

function openInstance(instance, teamId) {
  open = { instance, teamId };
  $("log-replica").replaceChildren(el("option", { value: "" }, "All replicas"));
  const actions = [];
  if (mayOperate(teamId)) {
    for (const action of ["start", "stop", "restart"]) {
      const b = el("button", { type: "button", "data-action": action }, action[0].toUpperCase() + action.slice(1));
      b.addEventListener("click", async () => {
        try {
          await api("POST", "/api/v1/instances/" + encodeURIComponent(instance.id) + "/actions/" + action);
          error("");
          await renderInstance();
        } catch (e) { error(e.message); }
      });
      actions.push(b);
    }
  }
  $("instance-actions").replaceChildren(...actions);
  // HA is the team owners' (and platform admins').
  $("ha-form").hidden = !owns(teamId);
  const ha = instance.ha;
  $("ha-replicas").value = ha ? String(ha.replicas) : "0";
  $("ha-mode").value = ha ? ha.mode : "balanced";
  show("instance");
  tick();
}

async function tick() {
  try {
    if (open) await renderInstance(); else await render();
    error("");
  } catch (e) {
    if (e.status === 401) return signedOut();
    error(e.message);
  }
}

async function signedIn(user) {
  me = user;
  $("username").textContent = user.username;
  $("who").hidden = false;
  show("teams");
  await tick();
  clearInterval(polling);
  polling = setInterval(tick, 2000);
}

function signedOut() {
  clearInterval(polling);
  me = null;
  open = null;
  $("who").hidden = true;
  show("signin");
}

async function start() {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const user = await api("POST", "/api/v1/auth/login", { username: $("signin-username").value, password: $("signin-password").value });
      $("signin-password").value = "";
      error("");
      await signedIn(user);
    } catch (e) { error(e.message); }
  });
  $("setup-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("setup-token").value.trim();
    const password = $("setup-password").value;
    try {
      await api("PUT", "/api/v1/user/password", { current: "", new: password }, { authorization: "Bearer " + token });
      const user = await api("POST", "/api/v1/auth/login", { username: "admin", password });
      $("setup-token").value = ""; $("setup-password").value = "";
      error("");
      await signedIn(user);
    } catch (e) { error(e.message); }
  });
  $("show-setup").addEventListener("click", () => show("setup"));
  $("back").addEventListener("click", () => { open = null; show("teams"); tick(); });
  $("log-replica").addEventListener("change", () => tick());
  $("ha-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!open) return;
    const path = "/api/v1/instances/" + encodeURIComponent(open.instance.id) + "/ha";
    const replicas = Number($("ha-replicas").value);
    try {
      if (replicas === 0) {
        await api("DELETE", path);
      } else {
        await api("PUT", path, { replicas, mode: $("ha-mode").value });
      }
      error("");
      await tick();
    } catch (e) { error(e.message); }
  });
  $("signout").addEventListener("click", async () => {
    try { await api("POST", "/api/v1/auth/logout"); } catch (e) { /* signed out either way */ }
    signedOut();
  });
  try {
    await signedIn(await api("GET", "/api/v1/user"));
  } catch (e) {
    if (e.status === 401) signedOut(); else error(e.message);
  }
}

start();
