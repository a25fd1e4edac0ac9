"""Generates deploy/grafana/doppel.json, the Doppel dashboard, from the panel list below:

    python3 tools/grafana_dashboard.py > deploy/grafana/doppel.json

A test checks that the file is what this script prints, that it is valid against
Grafana's published dashboard schema, and that every metric it uses exists.
"""
import json
panels_spec = [
    # (title, description, unit, [(expr, legend)])
    ("MQTT connections", "Devices connected now, per node.", "short",
     [("sum by (instance) (doppel_mqtt_connections)", "{{instance}}")]),
    ("CONNECTs by result", "CONNECT packets answered per second, by the CONNACK's result.", "ops",
     [("sum by (result) (rate(doppel_mqtt_connects_total[$__rate_interval]))", "{{result}}")]),
    ("Shadow requests by result code", "Shadow requests answered per second (MQTT and GraphQL), by operation and result code.", "ops",
     [("sum by (op, code) (rate(doppel_shadow_requests_total[$__rate_interval]))", "{{op}} {{code}}")]),
    ("Durable commit latency", "Time a group commit takes; every change in it waited that long.", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(doppel_commit_duration_seconds_bucket[$__rate_interval])))", "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(doppel_commit_duration_seconds_bucket[$__rate_interval])))", "p99")]),
    ("Writes per commit", "Average changes sharing one durable commit, and commits per second.", "short",
     [("sum(rate(doppel_commit_batch_writes_sum[$__rate_interval])) / sum(rate(doppel_commit_batch_writes_count[$__rate_interval]))", "writes per commit"),
      ("sum(rate(doppel_commit_batch_writes_count[$__rate_interval]))", "commits/s")]),
    ("Queues", "Requests in flight to twins (429 at max_pending_requests), messages waiting in the shards' and twins' mailboxes, and commit requests waiting.", "short",
     [("sum by (instance) (doppel_twin_requests_in_flight)", "in flight {{instance}}"),
      ("sum by (instance, mailbox) (doppel_mailbox_messages)", "{{mailbox}} mailboxes {{instance}}"),
      ("sum by (instance) (doppel_commit_queue)", "commit queue {{instance}}")]),
    ("Twins in memory", "Twins resident, and activations and passivations per second.", "short",
     [("sum by (instance) (doppel_twins_resident)", "resident {{instance}}"),
      ("sum(rate(doppel_twins_activated_total[$__rate_interval]))", "activated/s"),
      ("sum(rate(doppel_twins_passivated_total[$__rate_interval]))", "passivated/s")]),
    ("429s by cause", "Requests refused because a bound was reached, per second.", "ops",
     [("sum by (cause) (rate(doppel_overload_rejections_total[$__rate_interval]))", "{{cause}}")]),
    ("GraphQL requests", "GraphQL requests per second by operation type and outcome.", "ops",
     [("sum by (type, outcome) (rate(doppel_graphql_requests_total[$__rate_interval]))", "{{type}} {{outcome}}")]),
    ("GraphQL latency (p99)", "99th percentile of GraphQL request duration by operation type.", "s",
     [("histogram_quantile(0.99, sum by (type, le) (rate(doppel_graphql_request_duration_seconds_bucket[$__rate_interval])))", "{{type}}")]),
    ("Subscriptions", "GraphQL subscriptions open, and Lagged events sent per second.", "short",
     [("sum(doppel_graphql_subscriptions)", "open"),
      ("sum(rate(doppel_graphql_lagged_total[$__rate_interval]))", "Lagged/s")]),
    ("Commands", "Command execution changes per second, by the status reached.", "ops",
     [("sum by (status) (rate(doppel_command_executions_total[$__rate_interval]))", "{{status}}")]),
    ("Jobs", "Job execution changes per second by status, rollouts running, and rollouts that ended by outcome.", "short",
     [("sum by (status) (rate(doppel_job_executions_total[$__rate_interval]))", "{{status}}"),
      ("sum(doppel_rollouts_active)", "rollouts active"),
      ("sum by (outcome) (increase(doppel_rollouts_ended_total[$__rate_interval]))", "rollouts {{outcome}}")]),
    ("Store errors", "Failed durable commits per second, by kind.", "ops",
     [("sum by (kind) (rate(doppel_store_errors_total[$__rate_interval]))", "{{kind}}"),
      ("min(doppel_ready)", "ready (1 = yes)")]),
    ("CPU", "CPU time used per second (1 = one core).", "short",
     [("sum by (instance) (rate(process_cpu_seconds_total{job=\"doppel\"}[$__rate_interval]))", "{{instance}}")]),
    ("Memory and file descriptors", "Resident memory against the memory limit, and open files.", "bytes",
     [("process_resident_memory_bytes{job=\"doppel\"}", "RSS {{instance}}"),
      ("doppel_memory_limit_bytes", "limit {{instance}}")]),
    ("Open files", "Open file descriptors against the limit.", "short",
     [("process_open_fds{job=\"doppel\"}", "open {{instance}}"),
      ("process_max_fds{job=\"doppel\"}", "limit {{instance}}")]),
]
ds = {"type": "prometheus", "uid": "${datasource}"}
panels = []
for i, (title, desc, unit, targets) in enumerate(panels_spec):
    panels.append({
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": ds,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [{"refId": chr(ord("A") + j), "datasource": ds, "expr": e, "legendFormat": l}
                    for j, (e, l) in enumerate(targets)],
    })
dash = {
    "title": "Doppel",
    "uid": "doppel-overview",
    "description": "Doppel nodes: devices, shadow updates, durable commits, twins, GraphQL, commands and jobs, store health and resources.",
    "tags": ["doppel", "iot"],
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-1h", "to": "now"},
    "timepicker": {},
    "timezone": "browser",
    "refresh": "30s",
    "fiscalYearStartMonth": 0,
    "liveNow": False,
    "links": [],
    "annotations": {"list": []},
    "templating": {"list": [{
        "name": "datasource", "label": "Prometheus", "type": "datasource",
        "query": "prometheus", "hide": 0, "refresh": 1,
        "options": [], "includeAll": False, "multi": False, "skipUrlSync": False,
        "regex": ""}]},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
