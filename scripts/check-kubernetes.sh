#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/kubernetes: renders every overlay and the monitoring
# component with `kubectl kustomize`, validates the output strictly against the Kubernetes schemas
# (kubernetes-validate, from PyPI, pinned in testkit/python/requirements.txt) for the oldest
# Kubernetes the manifests support (1.30: the preStop `sleep` action) and the newest the validator
# knows, and checks what the schemas cannot: the production habits the deployment promises (probes,
# drain, non-root, read-only root, no token, credentials only from Secrets), that its settings are
# deploy/shoal.env's, that the HorizontalPodAutoscaler's metrics are served by the adapter rules, and
# that the PrometheusRule carries exactly the groups of deploy/prometheus/alerts.yml.
#
# Usage: scripts/check-kubernetes.sh [--out DIR]   (keeps the rendered manifests in DIR)
# Run by the test suite (server/tests/it/deploy_assets.rs); needs scripts/install-deps.sh (kubectl)
# and testkit/python/.venv (scripts/test.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."

out=""
if [ "${1:-}" = "--out" ]; then out=$2; fi
venv=testkit/python/.venv
[ -x "$venv/bin/kubernetes-validate" ] \
  || { echo "kubernetes-validate missing: python3 -m venv $venv && $venv/bin/pip install -r testkit/python/requirements.txt" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "kubectl missing: scripts/install-deps.sh installs it (kubernetes-client)" >&2; exit 1; }

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
render() { # name, kustomization directory
  kubectl kustomize "$2" >"$dir/$1.yaml" 2>"$dir/$1.err" || { cat "$dir/$1.err" >&2; echo "$2 does not render" >&2; exit 1; }
  echo "rendered $2: $(grep -c '^kind:' "$dir/$1.yaml") objects"
}
for overlay in deploy/kubernetes/overlays/*/; do
  render "$(basename "$overlay")" "$overlay"
done
render monitoring deploy/kubernetes/monitoring

for version in 1.30.0 1.37.0; do
  for file in "$dir"/*.yaml deploy/kubernetes/examples/ingress.yaml; do
    # Custom resources (the Prometheus Operator's, the Gateway API's) have no schema here: the
    # checks below cover them.
    [ "$(basename "$file")" = monitoring.yaml ] && continue
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$file" \
      || { echo "$file is not valid Kubernetes $version" >&2; exit 1; }
  done
  echo "valid (strict) against Kubernetes $version"
done

"$venv/bin/python" - "$dir" <<'EOF'
import glob, os, sys
import yaml

rendered = sys.argv[1]
failures = []

def check(condition, what):
    if not condition:
        failures.append(what)

def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

def env_file(path):
    pairs = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs

CREDENTIALS = {"SHOAL_REDIS_URL", "SHOAL_DATABASE_URL", "SHOAL_DATABASE_WRITE_URL",
               "SHOAL_REQUEST_STATE_KEY", "SHOAL_API_KEYS"}
shared = env_file("deploy/shoal.env")
adapter = yaml.safe_load(open("deploy/kubernetes/monitoring/prometheus-adapter-rules.yaml"))
served = {rule["name"]["as"] for rule in adapter["rules"]}

overlays = sorted(glob.glob(os.path.join(rendered, "*.yaml")))
for path in overlays:
    name = os.path.basename(path)[:-5]
    if name == "monitoring":
        continue
    docs = load(path)
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    where = f"{name}:"
    check(not kinds.get("Secret"), f"{where} a Secret is rendered (credentials are created by the operator, never shipped)")
    for kind in ["Deployment", "Service", "ServiceAccount", "ConfigMap", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "NetworkPolicy"]:
        check(kind in kinds, f"{where} no {kind}")
    (deployment,) = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check(pod.get("automountServiceAccountToken") is False, f"{where} the service-account token is mounted")
    check(pod["securityContext"].get("runAsNonRoot") is True, f"{where} not runAsNonRoot")
    security = container["securityContext"]
    check(security.get("readOnlyRootFilesystem") is True, f"{where} root filesystem writable")
    check(security.get("allowPrivilegeEscalation") is False, f"{where} privilege escalation allowed")
    check(security.get("capabilities", {}).get("drop") == ["ALL"], f"{where} capabilities not all dropped")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{where} readiness is not /readyz")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{where} liveness is not /healthz")
    check(pod.get("topologySpreadConstraints"), f"{where} no topology spread")
    resources = container.get("resources", {})
    check("memory" in resources.get("requests", {}) and "memory" in resources.get("limits", {}),
          f"{where} no memory request and limit")
    check("cpu" in resources.get("requests", {}), f"{where} no CPU request")
    (config,) = kinds["ConfigMap"]
    data = config["data"]
    for key, value in shared.items():
        check(data.get(key) == value, f"{where} {key} is {data.get(key)!r}, deploy/shoal.env says {value!r}")
    for key in CREDENTIALS:
        check(key not in data, f"{where} the credential {key} is in the ConfigMap")
    env = {e["name"]: e for e in container.get("env", [])}
    for key in CREDENTIALS & env.keys():
        check("secretKeyRef" in env[key].get("valueFrom", {}), f"{where} {key} is not from a Secret")
    check("SHOAL_REDIS_URL" in env, f"{where} no Redis URL")
    grace = int(data["SHOAL_SHUTDOWN_GRACE_SECS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    check(pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5,
          f"{where} terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < preStop {pre_stop} + shutdown grace {grace} + 5")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(data["SHOAL_LISTEN"].endswith(f":{ports['mcp']}"), f"{where} SHOAL_LISTEN is not the mcp port")
    check(data["SHOAL_ADMIN_LISTEN"].endswith(f":{ports['admin']}"), f"{where} SHOAL_ADMIN_LISTEN is not the admin port")
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"]:
        check(container[probe]["httpGet"]["port"] == "admin", f"{where} {probe} not on the admin port")
    (service,) = kinds["Service"]
    check(not service["spec"].get("sessionAffinity") or service["spec"]["sessionAffinity"] == "None",
          f"{where} session affinity set (none is needed)")
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    types = {m["type"] for m in hpa["spec"]["metrics"]}
    check({"Resource", "Pods"} <= types, f"{where} the autoscaler does not scale on CPU and a shoal metric")
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            check(metric["pods"]["metric"]["name"] in served,
                  f"{where} the autoscaler's {metric['pods']['metric']['name']} is not served by the adapter rules")
    policies = kinds["NetworkPolicy"]
    check(any("shoal-redis" == p["metadata"]["name"] for p in policies), f"{where} no Redis egress policy")
    check(all(set(p["spec"]["policyTypes"]) >= {"Egress"} for p in policies), f"{where} a policy without egress")

monitoring = load(os.path.join(rendered, "monitoring.yaml"))
kinds = {d["kind"]: d for d in monitoring}
check(set(kinds) == {"ServiceMonitor", "PrometheusRule"}, f"monitoring: {sorted(kinds)}")
alerts = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
check(kinds["PrometheusRule"]["spec"]["groups"] == alerts["groups"],
      "monitoring: the PrometheusRule's groups differ from deploy/prometheus/alerts.yml")
service_ports = {"mcp", "admin"}
for endpoint in kinds["ServiceMonitor"]["spec"]["endpoints"]:
    check(endpoint["port"] in service_ports, f"monitoring: ServiceMonitor port {endpoint['port']} is not the Service's")
check(kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "admin", "monitoring: not scraping the admin port")

if failures:
    print("\n".join("FAIL " + f for f in failures))
    sys.exit(1)
print(f"checked {len(overlays) - 1} overlays and the monitoring component")
EOF

if [ -n "$out" ]; then mkdir -p "$out" && cp "$dir"/*.yaml "$out"/; fi
echo "kubernetes manifests: ok"
