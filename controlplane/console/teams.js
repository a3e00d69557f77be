// Teams: the user's teams and a new one; a team's page with its members (owners add and remove
// them and change roles), its applications, and their pipelines as stages left to right, each
// with a deploy button and the deploy's progress per replica, live.
import { api, el, enc, error, session, owns, button, form, field, all, table, section, teams } from "./lib.js";

export async function teamsPage() {
  const list = el("div", { id: "teams-list" });
  async function draw() {
    const ts = await teams();
    list.replaceChildren(ts.length ? table(["Team", "Your role"], ts.map((t) =>
      el("tr", { "data-team": t.name }, el("td", {}, el("a", { href: "#/teams/" + enc(t.id) }, t.name)), el("td", {}, t.role || "platform admin")))) : el("p", { class: "muted" }, "You are in no team yet."));
  }
  const name = el("input", { id: "team-name", required: true });
  const root = el("section", { id: "page-teams" }, el("h2", {}, "Teams"), list,
    form({ id: "team-form", class: "inline" }, [...field("New team", name), el("button", { type: "submit" }, "Create")], async () => {
      const t = await api("POST", "/api/v1/teams", { name: name.value });
      location.hash = "#/teams/" + enc(t.id);
    }));
  await draw();
  return { root };
}

export async function teamPage(id) {
  const team = await api("GET", "/api/v1/teams/" + enc(id));
  await teams();
  const owner = owns(id);
  const members = el("div", { id: "members" });
  const apps = el("div", { id: "applications" });
  // Deploys started from this page, followed until they end: deployment id → element.
  const following = new Map();

  async function drawMembers() {
    const list = await all("/api/v1/teams/" + enc(id) + "/members");
    const rows = list.map((m) => {
      let role = m.role;
      if (owner) {
        role = el("select", { "aria-label": "Role of " + m.username, "data-role-of": m.username },
          ...["viewer", "member", "owner"].map((r) => el("option", { value: r }, r)));
        role.value = m.role;
        role.addEventListener("change", async () => {
          try {
            await api("PUT", "/api/v1/teams/" + enc(id) + "/members/" + enc(m.user_id), { role: role.value });
            m.role = role.value;
            error("");
          } catch (e) { role.value = m.role; error(e.message); }
        });
      }
      return el("tr", { "data-member": m.username }, el("td", {}, m.username), el("td", {}, role),
        el("td", {}, owner ? button("Remove", async () => {
          await api("DELETE", "/api/v1/teams/" + enc(id) + "/members/" + enc(m.user_id));
          await drawMembers();
        }) : ""));
    });
    const out = [table(["User", "Role", ""], rows)];
    if (owner) {
      const username = el("input", { id: "member-username", required: true, autocomplete: "off" });
      const role = el("select", { id: "member-role" }, ...["viewer", "member", "owner"].map((r) => el("option", { value: r }, r)));
      out.push(form({ id: "member-form", class: "inline" }, [...field("Username", username), ...field("Role", role), el("button", { type: "submit" }, "Add")], async () => {
        await api("POST", "/api/v1/teams/" + enc(id) + "/members", { username: username.value, role: role.value });
        username.value = "";
        await drawMembers();
      }));
    }
    members.replaceChildren(...out);
  }

  async function drawApps() {
    const list = await all("/api/v1/teams/" + enc(id) + "/applications");
    const blocks = [];
    for (const app of list) {
      const instances = await all("/api/v1/applications/" + enc(app.id) + "/instances");
      const pipelines = await all("/api/v1/applications/" + enc(app.id) + "/pipelines");
      blocks.push(el("div", { class: "application", "data-application": app.name },
        el("h4", {}, app.name, app.description ? el("span", { class: "muted" }, " — " + app.description) : null),
        el("p", {}, instances.length ? "Instances: " : "No instance. ",
          ...instances.flatMap((i, n) => [n ? ", " : "", el("a", { href: "#/instances/" + enc(i.id) }, i.name)])),
        ...pipelines.map((p) => pipeline(p, instances)),
        owner ? pipelineForm(app) : null));
    }
    const out = [...blocks];
    if (!list.length) out.push(el("p", { class: "muted" }, "No application yet."));
    if (owner) {
      const name = el("input", { id: "application-name", required: true });
      const description = el("input", { id: "application-description" });
      out.push(form({ id: "application-form", class: "inline" }, [...field("New application", name), ...field("Description", description), el("button", { type: "submit" }, "Create")], async () => {
        await api("POST", "/api/v1/applications", { team_id: id, name: name.value, description: description.value });
        name.value = ""; description.value = "";
        await drawApps();
      }));
    }
    apps.replaceChildren(...out);
  }

  // A pipeline: its stages left to right; from each stage but the last, a deploy to the next.
  function pipeline(p, instances) {
    const name = (iid) => (instances.find((i) => i.id === iid) || { name: iid }).name;
    const stages = [];
    p.stages.forEach((s, n) => {
      const last = n === p.stages.length - 1;
      const progress = el("div", { class: "progress-box" });
      stages.push(el("li", { class: "stage", "data-stage": s.name },
        el("strong", {}, s.name), el("span", {}, name(s.instance_id)), el("span", { class: "muted" }, s.action.replace(/_/g, " ")),
        !last && owner ? button("Deploy to " + p.stages[n + 1].name, async () => {
          const body = {};
          if (s.action === "prompt") {
            const snaps = await all("/api/v1/instances/" + enc(s.instance_id) + "/snapshots");
            if (!snaps.length) throw new Error("Stage " + s.name + " deploys a snapshot you pick, and its instance has none yet.");
            body.snapshot_id = snaps[snaps.length - 1].id;
          }
          const d = await api("POST", "/api/v1/pipelines/" + enc(p.id) + "/stages/" + enc(s.id) + "/deploy", body);
          following.set(d.id, progress);
          drawDeploy(d, progress);
        }, { "data-deploy": s.name }) : null,
        progress));
    });
    const out = el("div", { class: "pipeline", "data-pipeline": p.name },
      el("h5", {}, "Pipeline " + p.name),
      el("ol", { class: "stages" }, ...stages));
    if (owner) out.append(stageForm(p, instances));
    return out;
  }

  function drawDeploy(d, box) {
    box.replaceChildren(el("p", { class: "deploy-status", "data-status": d.status }, "Deploy " + d.status + (d.error ? ": " + d.error : "")),
      el("ol", { class: "progress" }, ...d.replicas.map((r) => el("li", { class: "step " + r.status }, r.id + ": " + r.status))));
  }

  function pipelineForm(app) {
    const name = el("input", { required: true, "aria-label": "New pipeline's name" });
    return form({ class: "inline pipeline-form" }, [el("label", {}, "New pipeline"), name, el("button", { type: "submit" }, "Create")], async () => {
      await api("POST", "/api/v1/pipelines", { application_id: app.id, name: name.value });
      await drawApps();
    });
  }

  function stageForm(p, instances) {
    const name = el("input", { required: true, "aria-label": "Stage name" });
    const instance = el("select", { "aria-label": "Stage instance" }, ...instances.map((i) => el("option", { value: i.id }, i.name)));
    const action = el("select", { "aria-label": "What the stage deploys" },
      el("option", { value: "create_snapshot" }, "a new snapshot"),
      el("option", { value: "use_latest_snapshot" }, "its latest snapshot"),
      el("option", { value: "prompt" }, "a snapshot picked at deploy"));
    return form({ class: "inline stage-form" }, [el("label", {}, "Add a stage"), name, instance, action, el("button", { type: "submit" }, "Add")], async () => {
      await api("POST", "/api/v1/pipelines/" + enc(p.id) + "/stages", { name: name.value, instance_id: instance.value, action: action.value });
      await drawApps();
    });
  }

  // Deploys in progress are followed every 2 s until they end.
  async function refresh() {
    for (const [did, box] of following) {
      const d = await api("GET", "/api/v1/deployments/" + enc(did));
      drawDeploy(d, box);
      if (!["pending", "running"].includes(d.status)) following.delete(did);
    }
  }

  const root = el("section", { id: "page-team", "data-team": team.name },
    el("p", {}, el("a", { href: "#/teams" }, "All teams")),
    el("h2", {}, team.name),
    el("p", { class: "muted" }, "Your role: " + (session.roles[id] || "platform admin")),
    section("Members", members),
    section("Applications and pipelines", apps));
  await Promise.all([drawMembers(), drawApps()]);
  return { root, refresh };
}
