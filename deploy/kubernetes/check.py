"""What no Kubernetes schema checks in deploy/kubernetes; check.sh runs it.

`python3 check.py split RENDERED SECRETS` prints the objects kubernetes-validate checks: the
rendered ones but the ServiceMonitor (a CRD it has no schema for), and the example Secrets.

`python3 check.py check RENDERED SECRETS PROMETHEUS_YML` checks that the objects fit together
and keep the decisions made for them: the Role grants exactly the driver's requests, the
Deployments are hardened and probed on endpoints Tandem serves, Services, budgets and network
policies select the pods they mean, the ServiceMonitor has a ServiceMonitor's shape and scrapes
what deploy/prometheus/prometheus.yml scrapes, and every Secret a pod names is in the examples.
Each failure is one line naming the object; the exit status is 1 if there is any.
"""

import re
import sys

import yaml

# The Kubernetes driver's requests. Its scenario tests (`kube` tests, a mock API server) assert
# every request it makes: change this list, the Role in rbac.yaml and the driver together.
DRIVER_RULES = {
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"get", "list", "create", "update", "delete"},
    ("", "configmaps"): {"get", "list", "create", "update", "delete"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}

TANDEM = {"app.kubernetes.io/name": "tandem"}
CONTROL_PLANE = {**TANDEM, "app.kubernetes.io/component": "control-plane"}
PROXY = {**TANDEM, "app.kubernetes.io/component": "proxy"}
NODE_RED = {"app.kubernetes.io/managed-by": "tandem", "app.kubernetes.io/component": "node-red"}
NODE_RED_PORT = 1880

# What each listener answers (README: the API listener has /healthz and /readyz, the metrics
# listeners of `tandem serve` and `tandem proxy` /healthz).
HEALTH_PATHS = {
    ("tandem-serve", "api"): {"/healthz", "/readyz"},
    ("tandem-serve", "metrics"): {"/healthz"},
    ("tandem-proxy", "metrics"): {"/healthz"},
}

# The fields of the ServiceMonitor CRD (monitoring.coreos.com/v1) this file may use: a typo is
# refused by the API server's field validation, so it is refused here first.
SERVICE_MONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints",
    "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector",
    "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols", "selector",
    "selectorMechanism", "targetLabels", "targetLimit",
}
SERVICE_MONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}
RELABEL = {"action", "modulus", "regex", "replacement", "separator", "sourceLabels", "targetLabel"}
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")

failures = []


def fail(obj, message):
    failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {message}")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def flag(args, name):
    """The value after `name` in a container's args, or None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def split(rendered, secrets):
    rendered = load(rendered)
    print(f"rendered {len(rendered)} objects: " + ", ".join(
        f"{o['kind']}/{o['metadata']['name']}" for o in rendered), file=sys.stderr)
    objects = [o for o in rendered if o["kind"] != "ServiceMonitor"] + load(secrets)
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)


# === the checks ===


def check_namespace(objects, namespace):
    for o in objects:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != namespace:
            fail(o, f"not in the namespace {namespace}")


def check_rbac(by_kind, serve):
    (role,) = by_kind["Role"]
    granted = {}
    for rule in role.get("rules", []):
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            fail(role, "names resourceNames or nonResourceURLs, which the driver's rules do not")
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                granted.setdefault((group, resource), set()).update(rule.get("verbs", []))
    if granted != DRIVER_RULES:
        for key in sorted(set(granted) | set(DRIVER_RULES)):
            want, have = DRIVER_RULES.get(key, set()), granted.get(key, set())
            if want != have:
                fail(role, f"{key[0] or 'core'}/{key[1]}: grants {sorted(have)}, the driver "
                     f"makes {sorted(want)} (change the Role, check.py and the kube tests together)")
    (binding,) = by_kind["RoleBinding"]
    account = serve["spec"]["template"]["spec"].get("serviceAccountName")
    if binding["roleRef"] != {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                              "name": role["metadata"]["name"]}:
        fail(binding, "does not bind the Role")
    subjects = [(s["kind"], s["name"], s.get("namespace")) for s in binding.get("subjects", [])]
    if subjects != [("ServiceAccount", account, serve["metadata"]["namespace"])]:
        fail(binding, f"binds {subjects}, not the control planes' ServiceAccount {account}")
    if account not in [a["metadata"]["name"] for a in by_kind["ServiceAccount"]]:
        fail(serve, f"its ServiceAccount {account} is not defined")


def check_hardening(deploy):
    pod = deploy["spec"]["template"]["spec"]
    sc = pod.get("securityContext", {})
    if sc.get("runAsNonRoot") is not True or not sc.get("runAsUser"):
        fail(deploy, "pods must run as a non-root user (runAsNonRoot and a numeric runAsUser)")
    if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(deploy, "pods need the RuntimeDefault seccomp profile")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            fail(deploy, f"pods must not share the node's namespaces ({host})")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        fail(deploy, "pods must not mount the node's paths (hostPath)")
    if not pod.get("serviceAccountName") and pod.get("automountServiceAccountToken") is not False:
        fail(deploy, "pods that do not call the Kubernetes API mount no token (automountServiceAccountToken: false)")
    if pod.get("enableServiceLinks") is not False:
        fail(deploy, "enableServiceLinks must be false (Services' variables share Tandem's TANDEM_ prefix)")
    for c in pod["containers"]:
        csc = c.get("securityContext", {})
        if csc.get("readOnlyRootFilesystem") is not True:
            fail(deploy, f"{c['name']}: the root filesystem must be read-only")
        if csc.get("privileged"):
            fail(deploy, f"{c['name']}: must not be privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(deploy, f"{c['name']}: allowPrivilegeEscalation must be false")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or caps.get("add"):
            fail(deploy, f"{c['name']}: must drop ALL capabilities and add none")
        for kind in ("requests", "limits"):
            if set(c.get("resources", {}).get(kind, {})) < {"cpu", "memory"}:
                fail(deploy, f"{c['name']}: resources.{kind} needs cpu and memory")


def check_probes(deploy):
    name = deploy["metadata"]["name"]
    for c in deploy["spec"]["template"]["spec"]["containers"]:
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe not in c:
                if probe != "startupProbe":
                    fail(deploy, f"{c['name']}: no {probe}")
                continue
            get = c[probe].get("httpGet")
            if not get:
                fail(deploy, f"{c['name']}: {probe} is not an HTTP GET of a health endpoint")
                continue
            port = get["port"]
            port_name = port if isinstance(port, str) else next(
                (n for n, p in ports.items() if p == port), None)
            allowed = HEALTH_PATHS.get((name, port_name), set())
            if get["path"] not in allowed:
                fail(deploy, f"{c['name']}: {probe} asks {get['path']} on port {port}, which "
                     f"answers {sorted(allowed) or 'no health path'}")


def check_volumes(deploy):
    """Paths Tandem writes lie in an emptyDir (the root filesystem is read-only), below its
    mount point (Tandem makes its data directory 0700, which it cannot do to a directory it does
    not own); files it reads from Secrets are in a mounted Secret."""
    pod = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        mounts = [(m["mountPath"].rstrip("/"), volumes.get(m["name"], {})) for m in c.get("volumeMounts", [])]
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                fail(deploy, f"{c['name']}: mounts an undefined volume {m['name']}")

        def volume_of(path):
            found = [(mp, v) for mp, v in mounts if path.startswith(mp + "/")]
            return max(found, key=lambda f: len(f[0]), default=(None, {}))

        args = c.get("args", [])
        for writable in ("--data-dir", "--cache-file"):
            path = flag(args, writable)
            if path and "emptyDir" not in volume_of(path)[1]:
                fail(deploy, f"{c['name']}: {writable} {path} is not below an emptyDir mount")
        for secret_file in ("--platform-key-file", "--token-file"):
            path = flag(args, secret_file)
            if not path:
                continue
            mount_path, volume = volume_of(path)
            secret = volume.get("secret")
            items = [i["path"] for i in (secret or {}).get("items", [])]
            if not secret or (items and path[len(mount_path) + 1:] not in items):
                fail(deploy, f"{c['name']}: {secret_file} {path} is not a file of a mounted Secret")


def check_secrets(deploy, examples):
    keys = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in examples}
    pod = deploy["spec"]["template"]["spec"]
    wanted = []
    for c in pod["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                wanted.append((ref["name"], ref["key"]))
    for v in pod.get("volumes", []):
        if "secret" in v:
            items = v["secret"].get("items") or [{"key": k} for k in keys.get(v["secret"]["secretName"], [])]
            wanted += [(v["secret"]["secretName"], i["key"]) for i in items]
    for name, key in wanted:
        if key not in keys.get(name, set()):
            fail(deploy, f"uses Secret {name} key {key}, which secrets.example.yaml lacks")


def check_serve(serve):
    c = serve["spec"]["template"]["spec"]["containers"][0]
    args = c.get("args", [])
    for name, value in (("--driver", "kubernetes"), ("--kube-image", "nodered/node-red"),
                        ("--kube-namespace", "$(POD_NAMESPACE)"),
                        ("--storage-url", "http://tandem-api:3000")):
        if flag(args, name) != value:
            fail(serve, f"needs {name} {value}")
    if "--no-proxy" not in args:
        fail(serve, "needs --no-proxy: the tandem-proxy Deployment serves the instances")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.namespace":
        fail(serve, "POD_NAMESPACE must come from the downward API (metadata.namespace)")
    if serve["spec"]["replicas"] != 2:
        fail(serve, "runs 2 control planes")
    if "TANDEM_DATABASE_URL" not in env and not flag(args, "--database-url"):
        fail(serve, "needs PostgreSQL (TANDEM_DATABASE_URL): control planes share one database")


def check_proxy(proxy, api_service):
    c = proxy["spec"]["template"]["spec"]["containers"][0]
    args = c.get("args", [])
    api_port = next(p["port"] for p in api_service["spec"]["ports"] if p["name"] == "api")
    want = f"http://{api_service['metadata']['name']}:{api_port}"
    if args[:1] != ["proxy"] or flag(args, "--control-plane") != want:
        fail(proxy, f"must run `tandem proxy --control-plane {want}`")
    if not flag(args, "--token-file"):
        fail(proxy, "needs --token-file (the proxy token)")
    if proxy["spec"]["replicas"] != 2:
        fail(proxy, "runs 2 proxies")


def pods_selected(selector, deployments):
    return [d for d in deployments if matches(selector, d["spec"]["template"]["metadata"]["labels"])]


def check_services(services, deployments):
    for s in services:
        selected = pods_selected(s["spec"]["selector"], deployments)
        if len(selected) != 1:
            fail(s, f"selects the pods of {len(selected)} Deployments, not one")
            continue
        containers = selected[0]["spec"]["template"]["spec"]["containers"]
        ports = {(p.get("name"), p["containerPort"]) for c in containers for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if not any(target in pair for pair in ports):
                fail(s, f"port {p['name']} targets {target}, which no container declares")


def check_deployments(deployments, expected_labels):
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not matches(d["spec"]["selector"]["matchLabels"], labels):
            fail(d, "its selector does not match its own pods")
        if not matches(expected_labels[d["metadata"]["name"]], labels):
            fail(d, f"its pods need the labels {expected_labels[d['metadata']['name']]}")


def check_budgets(budgets, deployments):
    for b in budgets:
        selected = pods_selected(b["spec"]["selector"]["matchLabels"], deployments)
        if len(selected) != 1:
            fail(b, f"covers the pods of {len(selected)} Deployments, not one")
            continue
        replicas = selected[0]["spec"]["replicas"]
        if "minAvailable" in b["spec"] and not 0 < b["spec"]["minAvailable"] < replicas:
            fail(b, f"minAvailable must let one of {replicas} pods go and keep one")
    for d in deployments:
        if not any(matches(b["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]) for b in budgets):
            fail(d, "has no PodDisruptionBudget")


def peers(rule, direction):
    """The pod selectors of a rule's peers as sorted label tuples (None for other peers)."""
    return [labels_key(p.get("podSelector", {}).get("matchLabels")) for p in rule.get(direction, [])]


def labels_key(labels):
    return tuple(sorted(labels.items())) if labels else None


def rule_ports(rule):
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def check_network(policies, serve, proxy):
    def port(deploy, name):
        return next(p["containerPort"] for c in deploy["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", []) if p["name"] == name)

    node_red = [p for p in policies if p["spec"]["podSelector"].get("matchLabels") == NODE_RED]
    ingress = [r for p in node_red if "Ingress" in p["spec"]["policyTypes"] for r in p["spec"].get("ingress", [])]
    egress = [r for p in node_red if "Egress" in p["spec"]["policyTypes"] for r in p["spec"].get("egress", [])]
    name = {"kind": "NetworkPolicy", "metadata": {"name": "(Node-RED pods)"}}
    if not ingress:
        fail(name, "nothing limits who reaches the Node-RED pods")
    for r in ingress:
        if sorted(peers(r, "from"), key=str) != sorted(map(labels_key, [CONTROL_PLANE, PROXY])) \
                or rule_ports(r) != {("TCP", NODE_RED_PORT)}:
            fail(name, f"an ingress rule lets in more than the control planes and proxies on {NODE_RED_PORT}: {r}")
    reach = {(sel, pr) for r in egress for sel in peers(r, "to") if sel for pr in rule_ports(r)}
    for sel, pr in ((CONTROL_PLANE, ("TCP", port(serve, "api"))), (PROXY, ("TCP", port(proxy, "mqtt")))):
        if (labels_key(sel), pr) not in reach:
            fail(name, f"Node-RED pods cannot reach {sel['app.kubernetes.io/component']} on {pr[1]}")
    for r in egress:
        for sel in peers(r, "to"):
            if sel and sel not in (labels_key(CONTROL_PLANE), labels_key(PROXY)):
                fail(name, f"Node-RED pods may reach other pods: {sel}")


def check_service_monitor(monitors, services, prometheus):
    if len(monitors) != 1:
        failures.append(f"ServiceMonitor: {len(monitors)} found, expected one")
        return
    (m,) = monitors
    if m.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(m, f"apiVersion is {m.get('apiVersion')}, not monitoring.coreos.com/v1")
    spec = m.get("spec", {})
    if set(spec) - SERVICE_MONITOR_SPEC:
        fail(m, f"unknown spec fields {sorted(set(spec) - SERVICE_MONITOR_SPEC)}")
    selector = spec.get("selector", {}).get("matchLabels")
    if not selector or set(spec.get("selector", {})) - {"matchLabels"}:
        fail(m, "spec.selector needs matchLabels (and only that here)")
        return
    selected = [s for s in services if matches(selector, s["metadata"].get("labels", {}))]
    names = sorted(s["metadata"]["name"] for s in selected)
    if names != sorted(s["metadata"]["name"] for s in services):
        fail(m, f"selects the Services {names}, not every one of Tandem's")
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        fail(m, "no endpoints")
    for e in endpoints:
        if set(e) - SERVICE_MONITOR_ENDPOINT:
            fail(m, f"unknown endpoint fields {sorted(set(e) - SERVICE_MONITOR_ENDPOINT)}")
        for s in selected:
            if e.get("port") not in [p.get("name") for p in s["spec"]["ports"]]:
                fail(m, f"endpoint port {e.get('port')!r} is not a named port of Service {s['metadata']['name']}")
        for key in ("interval", "scrapeTimeout"):
            if key in e and not DURATION.match(e[key]):
                fail(m, f"endpoint {key} {e[key]!r} is not a duration")
        for r in e.get("metricRelabelings", []) + e.get("relabelings", []):
            if set(r) - RELABEL:
                fail(m, f"unknown relabeling fields {sorted(set(r) - RELABEL)}")
    # The jobs alerts.yml and the dashboard name, relabelled as prometheus.yml relabels them.
    jobs = {c["job_name"]: c for c in prometheus["scrape_configs"]}
    job_label = spec.get("jobLabel")
    got = sorted(s["metadata"].get("labels", {}).get(job_label, "") for s in selected)
    if not job_label or got != sorted(jobs):
        fail(m, f"jobs would be {got}, deploy/prometheus/prometheus.yml scrapes {sorted(jobs)}")
    camel = {"source_labels": "sourceLabels", "target_label": "targetLabel"}
    for job in jobs.values():
        want = [{camel.get(k, k): v for k, v in r.items()} for r in job.get("metric_relabel_configs", [])]
        if any(e.get("metricRelabelings", []) != want for e in endpoints):
            fail(m, f"metricRelabelings differ from prometheus.yml's job {job['job_name']}: {want}")


def check(rendered, secrets, prometheus_yml):
    objects = load(rendered)
    examples = load(secrets)
    with open(prometheus_yml) as f:
        prometheus = yaml.safe_load(f)
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    for kind in ("Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service",
                 "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"):
        if kind not in by_kind:
            failures.append(f"{kind}: none rendered")
    if failures:
        return
    (namespace,) = [n["metadata"]["name"] for n in by_kind["Namespace"]]
    check_namespace(objects + examples, namespace)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    serve, proxy = deployments["tandem-serve"], deployments["tandem-proxy"]
    (api_service,) = [s for s in by_kind["Service"] if matches(s["spec"]["selector"], CONTROL_PLANE)]
    check_deployments(deployments.values(), {"tandem-serve": CONTROL_PLANE, "tandem-proxy": PROXY})
    check_rbac(by_kind, serve)
    for d in deployments.values():
        check_hardening(d)
        check_probes(d)
        check_volumes(d)
        check_secrets(d, examples)
    for s in examples:
        if "tandem.dev/example" not in s["metadata"].get("annotations", {}):
            fail(s, "an example Secret must say so (annotation tandem.dev/example)")
    check_serve(serve)
    check_proxy(proxy, api_service)
    check_services(by_kind["Service"], deployments.values())
    check_budgets(by_kind["PodDisruptionBudget"], deployments.values())
    check_network(by_kind["NetworkPolicy"], serve, proxy)
    check_service_monitor(by_kind["ServiceMonitor"], by_kind["Service"], prometheus)
    print(f"checked {len(objects)} rendered objects (the ServiceMonitor's shape included) and "
          f"{len(examples)} example Secrets")


def main(argv):
    if len(argv) == 4 and argv[1] == "split":
        split(argv[2], argv[3])
        return 0
    if len(argv) == 5 and argv[1] == "check":
        check(argv[2], argv[3], argv[4])
        for f in failures:
            print(f"FAIL {f}")
        return 1 if failures else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
