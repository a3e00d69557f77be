// Tandem's console: first run, sign in and out, and the pages, one per address after `#`:
//   #/                 the instances of the user's teams, their state and a dot per replica
//   #/new              create an instance
//   #/instances/<id>   an instance: actions, HA, settings, modules, snapshots, deploys, log, audit
//   #/teams            teams; #/teams/<id>: members, applications, pipelines
//   #/account          the user's password and tokens
//   #/admin            users, stacks, templates (platform admins)
// The open page is drawn again every 2 s (states follow without a reload); a page with forms
// keeps what is typed, since only its live parts are drawn again.
import { $, api, el, error, session, teams, all, enc, table } from "./lib.js";
import { instancePage } from "./instance.js";
import { teamsPage, teamPage } from "./teams.js";
import { createPage } from "./create.js";
import { accountPage, adminPage } from "./account.js";

// The page shown: `{ root, refresh }`; `refresh` is called every 2 s while it is shown.
let current = null;
let polling = null;

const routes = [
  [/^#?\/?$/, () => homePage()],
  [/^#\/new$/, () => createPage()],
  [/^#\/instances\/([^/]+)$/, (id) => instancePage(decodeURIComponent(id))],
  [/^#\/teams$/, () => teamsPage()],
  [/^#\/teams\/([^/]+)$/, (id) => teamPage(decodeURIComponent(id))],
  [/^#\/account$/, () => accountPage()],
  [/^#\/admin$/, () => adminPage()],
];

async function route() {
  if (!session.me) return;
  const hash = location.hash || "#/";
  for (const [re, page] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    if (current && current.leave) current.leave();
    current = null;
    error("");
    try {
      const p = await page(...m.slice(1));
      current = p;
      $("view").replaceChildren(p.root);
      const h = p.root.querySelector("h2");
      if (h) { h.tabIndex = -1; h.focus({ preventScroll: true }); }
    } catch (e) {
      if (e.status === 401) return signedOut();
      $("view").replaceChildren(el("section", { id: "page-error" }, el("h2", {}, "Not shown"), el("p", {}, e.message)));
    }
    return;
  }
  $("view").replaceChildren(el("section", { id: "page-error" }, el("h2", {}, "No such page"), el("p", {}, el("a", { href: "#/" }, "All instances"))));
}

async function tick() {
  const page = current;
  if (!page || !page.refresh) return;
  try {
    await page.refresh();
  } catch (e) {
    // A page left meanwhile (an instance just deleted) says nothing on the next page.
    if (page !== current) return;
    if (e.status === 401) return signedOut();
    if (!e.offline) error(e.message);
  }
}

// The home page: every instance of every team of the user, live.
async function homePage() {
  const list = el("div", { id: "team-list" });
  const root = el("section", { id: "page-home" },
    el("div", { class: "title" }, el("h2", {}, "Instances"), el("a", { href: "#/new", class: "button", id: "new-instance" }, "New instance")),
    list);
  async function refresh() {
    const ts = await teams();
    const blocks = [];
    for (const team of ts) {
      const instances = await all("/api/v1/teams/" + enc(team.id) + "/instances");
      const rows = [];
      for (const i of instances) {
        const status = (await api("GET", "/api/v1/instances/" + enc(i.id) + "/status")).observed;
        const dots = el("span", { class: "dots", role: "img", "aria-label": status.summary });
        for (const r of status.replicas || []) {
          dots.append(el("span", { class: "dot " + r.state, title: r.id + ": " + r.state, "data-replica": r.id }));
        }
        rows.push(el("tr", { "data-instance": i.name },
          el("td", {}, el("a", { href: "#/instances/" + enc(i.id), "data-open": i.id }, i.name), i.ha ? el("span", { class: "badge" }, "HA") : null),
          el("td", { class: "state" }, status.summary + (status.reason ? " — " + status.reason : "")),
          el("td", {}, dots),
          el("td", {}, el("a", { href: i.url, target: "_blank", rel: "noopener" }, i.url))));
      }
      blocks.push(el("div", { class: "team" },
        el("h3", {}, el("a", { href: "#/teams/" + enc(team.id) }, team.name), " ", el("span", { class: "muted" }, team.role || "admin")),
        rows.length ? table(["Instance", "State", "Replicas", "URL"], rows) : el("p", { class: "muted" }, "No instance yet.")));
    }
    if (!ts.length) blocks.push(el("p", { class: "muted" }, "You are in no team yet. ", el("a", { href: "#/teams" }, "Create one"), "."));
    list.replaceChildren(...blocks);
  }
  await refresh();
  return { root, refresh };
}

function show(id) {
  for (const s of ["setup", "signin"]) $(s).hidden = s !== id;
  $("view").hidden = id !== "view";
}

async function signedIn(user) {
  session.me = user;
  $("username").textContent = user.username;
  $("nav-admin").hidden = !user.admin;
  $("who").hidden = false;
  show("view");
  await route();
  clearInterval(polling);
  polling = setInterval(tick, 2000);
}

function signedOut() {
  clearInterval(polling);
  if (current && current.leave) current.leave();
  current = null;
  session.me = null;
  session.formToken = "";
  $("view").replaceChildren();
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
  $("signout").addEventListener("click", async () => {
    try { await api("POST", "/api/v1/auth/logout"); } catch (e) { /* signed out either way */ }
    signedOut();
  });
  window.addEventListener("hashchange", route);
  try {
    await signedIn(await api("GET", "/api/v1/user"));
  } catch (e) {
    if (e.status === 401) signedOut(); else error(e.message);
  }
}

start();
