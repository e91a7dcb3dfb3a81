#!/usr/bin/env bash
# docker-compose.yml is valid compose (no engine needed) and deploys what
# operations expect: Kafka in KRaft mode, topic retention at least the
# 35-day dedupe window, a worker healthcheck on /readyz with a tool the
# runtime image has, a Prometheus scraping every worker, credentials only
# from the environment (required ones fail without), and workers that
# scale (no container_name, no host port).
#
# usage: test_compose.sh DOCKER-COMPOSE.YML
set -euo pipefail
file=$(readlink -f "$1")
root=$(dirname "$file")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# An .env next to the file would fill the variables: run from elsewhere
# with --project-directory pointing at a folder without one.
dc() { (cd "$tmp" && docker-compose --project-directory "$root" -f "$file" "$@"); }
unset POSTGRES_PASSWORD REDIS_PASSWORD POSTGRES_USER POSTGRES_DB \
  PROMETHEUS_PORT TALLY_TOPIC_RETENTION_MS
[ ! -e "$root/.env" ] || echo "note: $root/.env exists (ignored here)"

echo "--- required credentials: config fails without them"
if dc config -q >"$tmp/out" 2>&1; then
  fail "docker-compose config passes without POSTGRES_PASSWORD"
fi
grep -Eq "POSTGRES_PASSWORD|REDIS_PASSWORD" "$tmp/out" ||
  fail "the error does not name the variable: $(cat "$tmp/out")"

echo "--- docker-compose config with credentials from the environment"
export POSTGRES_PASSWORD=pg-ci-secret-1 REDIS_PASSWORD=redis-ci-secret-2
dc config -q || fail "docker-compose config -q failed"
dc config >"$tmp/config.yml"
grep -q "$POSTGRES_PASSWORD" "$tmp/config.yml" ||
  fail "POSTGRES_PASSWORD does not reach the services"

/usr/bin/python3 - "$file" "$tmp/config.yml" "$root" <<'PY'
import os, re, sys, yaml

raw_path, cfg_path, root = sys.argv[1:4]
raw = open(raw_path).read()
cfg = yaml.safe_load(open(cfg_path))
svc = cfg["services"]
errors = []
def check(ok, what):
    if not ok:
        errors.append(what)

DAY_MS = 86400 * 1000
# Kafka: KRaft (a controller role, no ZooKeeper), retention >= 35 days.
kenv = svc["kafka"]["environment"]
check("controller" in kenv.get("KAFKA_PROCESS_ROLES", ""), "kafka is not KRaft")
check(not any("zookeeper" in (s.get("image") or "") for s in svc.values()),
      "a ZooKeeper service")
check(int(kenv.get("KAFKA_LOG_RETENTION_HOURS", 0)) >= 35 * 24,
      "broker retention below 35 days")
topics = svc["topics"]
cmd = " ".join(topics["command"]) if isinstance(topics["command"], list) \
    else topics["command"]
check("retention.ms" in cmd, "topics are created without retention.ms")
ret = int(topics["environment"]["RETENTION_MS"])
check(ret >= 35 * DAY_MS, f"topic retention {ret} ms < 35 days")
for t in ("token-usage", "token-usage.dlq", "cache-invalidation",
          "cache-invalidation.dlq"):
    check(t in cmd, f"topic {t} is not created")

# Worker: healthcheck on /readyz with a tool of the runtime image;
# scalable (no container_name, no host ports).
w = svc["worker"]
hc = w.get("healthcheck", {}).get("test", [])
hc_s = " ".join(hc) if isinstance(hc, list) else hc
check("/readyz" in hc_s, "the worker healthcheck does not ask /readyz")
tool = hc[1] if isinstance(hc, list) and hc[:1] == ["CMD"] else hc_s.split()[1]
dockerfile = open(os.path.join(root, "Dockerfile")).read()
runtime = dockerfile.split("\nFROM ")[-1]
check(re.search(r"\b%s\b" % re.escape(tool), runtime) is not None,
      f"the healthcheck's {tool} is not installed in the runtime image")
for name, s in svc.items():
    check("container_name" not in s, f"{name} has a fixed container_name")
check(not w.get("ports"), "the worker publishes a host port (no --scale)")
check(w["environment"].get("TALLY_METRICS_ADDR", "").endswith(":9464"),
      "the worker's metrics are not on :9464")

# Prometheus: a service with a config file that scrapes worker:9464.
p = svc.get("prometheus")
check(p is not None, "no prometheus service")
if p:
    mounts = [v if isinstance(v, str) else v.get("source", "") + ":" +
              v.get("target", "") for v in p.get("volumes", [])]
    conf = [m.split(":")[0] for m in mounts if "prometheus.yml" in m]
    check(conf and os.path.isfile(conf[0]), "prometheus.yml not mounted")
    if conf and os.path.isfile(conf[0]):
        pc = yaml.safe_load(open(conf[0]))
        targets = []
        for job in pc.get("scrape_configs", []):
            for sd in job.get("dns_sd_configs", []):
                targets += [f"{n}:{sd.get('port')}" for n in sd["names"]]
            for sc in job.get("static_configs", []):
                targets += sc.get("targets", [])
        check("worker:9464" in targets, f"prometheus scrapes {targets}")
        print("prometheus config:", os.path.relpath(conf[0], root))

# No literal credentials: every password-ish assignment in the file is a
# variable, and the DSN/URL carry none of their own.
for no, line in enumerate(raw.splitlines(), 1):
    body = line.split("#", 1)[0]
    if re.search(r"(?i)(password|passwd|secret)\s*[:=]", body):
        check("${" in body or "$$" in body, f"line {no}: literal credential: {line.strip()}")
    for m in re.finditer(r"://([^/@\s]*)@", body):
        check("${" in m.group(1), f"line {no}: credentials in a URL: {line.strip()}")
    check(not re.search(r"(?i)-a\s+\S+|requirepass\s+[^\"$\s]", body),
          f"line {no}: a literal Redis password")

if errors:
    for e in errors:
        print("FAIL:", e, file=sys.stderr)
    sys.exit(1)
print("compose: KRaft, retention %d days, worker healthcheck (%s), "
      "prometheus, scalable, no literal credentials" % (ret // DAY_MS, tool))
PY
if command -v promtool >/dev/null; then
  promtool check config "$root/scripts/compose/prometheus.yml" >/dev/null ||
    fail "scripts/compose/prometheus.yml is not valid"
fi
echo ok
