#!/usr/bin/env bash
# deploy/k8s/xkd.yaml, checked offline (no cluster): every resource valid against the Kubernetes
# API schemas with no unknown field (PyPI kubernetes-validate --strict, installed into
# .tools/k8s-venv once), the worker Job's completions and parallelism equal to the
# control.workers the coordinator runs with, configs/qwen2vl-to-qwen2audio.toml with the
# coordinator's --set arguments resolving through `xkd config show`, the metrics port
# (--metrics-listen) exposed: a TCP containerPort, a Service port, and the pod template's
# prometheus.io/scrape, port and path annotations naming it; and a NetworkPolicy that selects
# both Jobs' pods and admits traffic to them only from pods it selects, except on that port.
#   XKD: the xkd binary (default: the release build). tests/deploy.rs runs this.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=$root/.tools/k8s-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0
fi
"$venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/xkd.yaml
xkd=${XKD:-${CARGO_TARGET_DIR:-$root/target}/release/xkd}
"$venv/bin/python" - deploy/k8s/xkd.yaml configs/qwen2vl-to-qwen2audio.toml "$xkd" <<'PY'
import subprocess, sys, tomllib, yaml
manifest, recipe, xkd = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
jobs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Job"}
args = jobs["xkd-coordinator"]["template"]["spec"]["containers"][0]["args"]
sets = [a.split("=", 1)[1] for a in args if a.startswith("--set=")]
cmd = [xkd, "config", "show", "--config", recipe] + [x for s in sets for x in ("--set", s)]
out = subprocess.run(cmd, capture_output=True, text=True)
if out.returncode != 0:
    sys.exit(f"the coordinator's recipe does not resolve: {' '.join(cmd)}\n{out.stderr}")
config = tomllib.loads(out.stdout)
workers = jobs["xkd-workers"]
n = config["control"]["workers"]
if not workers["completions"] == workers["parallelism"] == n:
    sys.exit(f"control.workers is {n} but the worker Job has completions "
             f"{workers['completions']} and parallelism {workers['parallelism']}")
coordinator = jobs["xkd-coordinator"]["template"]
listen = [a.split("=", 1)[1] for a in args if a.startswith("--metrics-listen=")]
if len(listen) != 1:
    sys.exit(f"the coordinator has {len(listen)} --metrics-listen arguments; one is expected")
port = int(listen[0].rsplit(":", 1)[1])
notes = coordinator["metadata"].get("annotations", {})
want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics"}
for key, value in want.items():
    if notes.get(key) != value:
        sys.exit(f"the coordinator pod's annotation {key} is {notes.get(key)!r}, not {value!r}")
ports = coordinator["spec"]["containers"][0].get("ports", [])
named = [p for p in ports if p["containerPort"] == port and p.get("protocol", "TCP") == "TCP"]
if not named:
    sys.exit(f"the coordinator container exposes no TCP containerPort {port}")
service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "xkd-coordinator")
targets = [p for p in service["spec"]["ports"] if p.get("protocol", "TCP") == "TCP"
           and p.get("targetPort") in (port, named[0].get("name"))]
if not targets:
    sys.exit(f"the Service xkd-coordinator has no TCP port to the metrics port {port}")
run_id = config["run"]["run_id"]
policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
if len(policies) != 1:
    sys.exit(f"expected one NetworkPolicy, found {len(policies)}")
policy = policies[0]["spec"]
selected = policy["podSelector"]["matchLabels"]
for name, job in jobs.items():
    labels = job["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in selected.items()):
        sys.exit(f"the NetworkPolicy does not select the pods of Job {name}: {selected} vs {labels}")
if selected.get("app.kubernetes.io/instance") != run_id:
    sys.exit(f"the NetworkPolicy selects instance {selected.get('app.kubernetes.io/instance')}, not run {run_id}")
# Rules with sources admit only the run's pods; a rule without sources opens the metrics
# port and nothing else.
rules = policy.get("ingress", [])
sources = [p for rule in rules if "from" in rule for p in rule["from"]]
if "Ingress" not in policy.get("policyTypes", []) or not sources or any(
    set(p) != {"podSelector"} or p["podSelector"].get("matchLabels") != selected for p in sources
):
    sys.exit(f"the NetworkPolicy must admit ingress only from the pods it selects: {policy}")
for rule in rules:
    if "from" not in rule and rule.get("ports") != [{"port": port, "protocol": "TCP"}]:
        sys.exit(f"a NetworkPolicy rule open to every source must name the metrics port {port} only: {rule}")
print(f"{manifest}: valid; {n} workers; run {run_id} resolves from {recipe}; "
      f"metrics scraped at :{port}{want['prometheus.io/path']}; ingress only from the run's pods")
PY
