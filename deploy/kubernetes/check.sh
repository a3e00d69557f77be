#!/usr/bin/env bash
# Checks deploy/kubernetes without a cluster (CI runs it after the tests; README, "Run on
# Kubernetes"):
#   1. `kubectl kustomize` renders it;
#   2. `kubernetes-validate --strict` validates every rendered object and the example Secrets
#      against the schemas of Kubernetes $KUBE_VERSION (default 1.37.0; the package carries
#      them, nothing is downloaded), unknown fields included; the ServiceMonitor is left to 3,
#      since the validator has no schema for a CRD;
#   3. check.py checks what no schema says: the Role grants exactly the driver's requests, the
#      pods are hardened and probed on endpoints Tandem serves, Services, budgets and network
#      policies select the pods they mean, the ServiceMonitor has a ServiceMonitor's shape and
#      scrapes the Services' `metrics` port under deploy/prometheus/prometheus.yml's job names,
#      every Secret the pods use is in secrets.example.yaml.
# Needs kubectl and the PyPI package kubernetes-validate (.ci/run installs both).
set -euo pipefail
cd "$(dirname "$0")"

kube_version="${KUBE_VERSION:-1.37.0}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== kubectl kustomize deploy/kubernetes"
kubectl kustomize . >"$work/rendered.yaml"

echo "== kubernetes-validate --strict (Kubernetes $kube_version)"
python3 check.py split "$work/rendered.yaml" secrets.example.yaml >"$work/objects.yaml"
(cd "$work" && python3 -m kubernetes_validate --strict -k "$kube_version" objects.yaml) | tee "$work/validate.log"
# It only warns, and exits 0, for an object whose kind it has no schema for: a failure here.
if grep -v '^INFO ' "$work/validate.log"; then
  echo "FAIL: kubernetes-validate did not validate every object (above)"
  exit 1
fi

echo "== consistency (check.py)"
python3 check.py check "$work/rendered.yaml" secrets.example.yaml ../prometheus/prometheus.yml
echo "deploy/kubernetes: ok"
