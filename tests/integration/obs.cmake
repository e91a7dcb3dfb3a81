# Operations: /metrics under promtool and a real Prometheus, /healthz,
# 405, IPv6 listeners, JSON logs (test_obs.sh); /readyz through Postgres
# and Redis outages and the pipelines' histograms (test_obs_ready.sh, which
# needs the pipelines' readiness wiring). Both need Debian's prometheus.
tally_worker_test(obs)
tally_worker_test(obs_ready)
