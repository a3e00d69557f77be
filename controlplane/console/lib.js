// What every page of the console shares: calls to the API, building elements, the signed-in
// user and its roles, and the error line.
//
// Calls carry the session cookie (SameSite=Lax) and, on every write, the session's form token,
// which the API gives only to a page of its own origin (sign-in answer, GET /api/v1/user).
// Text goes into the page with textContent only: nothing from the API is ever parsed as HTML.

export const $ = (id) => document.getElementById(id);

// The signed-in user (`null` signed out), its form token, and its role in each team (what the
// console offers; the API decides).
export const session = { me: null, formToken: "", roles: {} };

export function mayOperate(teamId) {
  const r = session.roles[teamId];
  return (session.me && session.me.admin) || r === "member" || r === "owner";
}

export function owns(teamId) {
  return (session.me && session.me.admin) || session.roles[teamId] === "owner";
}

export function error(message) {
  const e = $("error");
  e.textContent = message || "";
  e.hidden = !message;
}

// A lost connection is said once, in the status line, and cleared by the next answer.
function connection(lost) {
  $("offline").hidden = !lost;
}

export async function api(method, path, body, headers) {
  const init = { method, headers: Object.assign({}, headers), credentials: "same-origin" };
  if (method !== "GET" && session.formToken) init.headers["x-tandem-form-token"] = session.formToken;
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    connection(true);
    const err = new Error("Tandem cannot be reached; retrying every 2 s.");
    err.offline = true;
    throw err;
  }
  connection(false);
  const token = res.headers.get("x-tandem-form-token");
  if (token) session.formToken = token;
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
  if (!res.ok) {
    const err = new Error((json && json.error && json.error.message) || text || res.statusText);
    err.status = res.status;
    throw err;
  }
  return json;
}

export const enc = encodeURIComponent;

export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// A button that runs `fn`, shows the API's error in words, and is disabled while it runs.
export function button(label, fn, attrs) {
  const b = el("button", Object.assign({ type: "button" }, attrs), label);
  b.addEventListener("click", () => run(b, fn));
  return b;
}

export async function run(control, fn) {
  control.disabled = true;
  try {
    await fn();
    error("");
  } catch (e) {
    error(e.message);
  } finally {
    control.disabled = false;
  }
}

// A form whose submit runs `fn` (with the same error handling as buttons).
export function form(attrs, children, fn) {
  const f = el("form", attrs, ...children);
  f.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const submit = f.querySelector("button[type=submit]") || f;
    run(submit, () => fn(f));
  });
  return f;
}

// A labelled control: `<label for=id>` and the control, as a pair of grid cells.
export function field(label, control) {
  if (!control.id) control.id = "f-" + Math.random().toString(36).slice(2);
  return [el("label", { for: control.id }, label), control];
}

export async function all(path) {
  let items = [], cursor = "";
  for (;;) {
    const page = await api("GET", path + (path.includes("?") ? "&" : "?") + "limit=500" + (cursor ? "&cursor=" + enc(cursor) : ""));
    items = items.concat(page.items);
    if (!page.next_cursor) return items;
    cursor = page.next_cursor;
  }
}

export function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

export function table(headings, rows, attrs) {
  return el("table", attrs,
    el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

export function section(title, ...children) {
  return el("section", { "aria-label": title }, el("h3", {}, title), ...children);
}

// The teams of the signed-in user, each with its role recorded in `session.roles`.
export async function teams() {
  const list = await all("/api/v1/teams");
  for (const t of list) session.roles[t.id] = t.role || null;
  return list;
}
