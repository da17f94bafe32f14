"""What deploy/ and compose.yaml promise: the Grafana dashboard (mounted by compose's `monitoring`
profile) is built only from metrics the API serves (every metric a panel queries appears in /metrics,
with the labels it groups by), and the rabbitmq profile's broker reaches every Ingot service."""

from __future__ import annotations

import json
import re

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ingot.json"
PROMQL_WORDS = {"sum", "max", "min", "by", "rate", "histogram_quantile", "le"}


def test_every_metric_a_panel_queries_is_served(api_url, client, configure):
    client.jobs()  # at least one request measured in this process
    configure(unauthenticated_rate_limit_per_minute=1)
    assert [httpx.get(f"{api_url}/api/v1/jobs").status_code for _ in range(2)] == [401, 429]  # one refusal counted
    exposed = httpx.get(f"{api_url}/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) ", exposed, re.MULTILINE))
    series = set(re.findall(r"^([a-z_]+)[{ ]", exposed, re.MULTILINE))
    # Label sets parsed by Prometheus' own parser: a route label holds braces ({source_id}).
    labels = {sample.name: set(sample.labels) for family in text_string_to_metric_families(exposed)
              for sample in family.samples}
    board = json.loads(DASHBOARD.read_text())
    queried = []
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "prometheus" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for name in re.findall(r"\b((?:ingot|process)_[a-z_]+)\b", expr):
                family = re.sub(r"_(bucket|sum|count|total)$", "", name)
                queried.append(name)
                # The series itself, as PromQL names it; or a family served with no series yet (no
                # webhook attempted, say), whose series would bear that name.
                has_series = any(s.startswith(family) for s in series)
                assert name in series or ({name, family} & families and not has_series), \
                    f"{panel['title']}: {name} is not in /metrics"
                shown = [names for sample, names in labels.items() if sample.startswith(family)]
                grouped = re.findall(r"by \(([^)]*)\)", expr)
                for label in (lbl.strip() for group in grouped for lbl in group.split(",")):
                    if label and label != "le" and shown:  # a family with no series yet has no labels to show
                        assert label in shown[0], f"{panel['title']}: {family} has no label {label}"
    assert {"ingot_queue_oldest_job_age_seconds", "ingot_db_pool_connections", "ingot_redis_up",
            "ingot_webhook_endpoints_paused", "ingot_process_uptime_seconds", "ingot_http_rate_limited_total",
            "ingot_http_request_duration_seconds_bucket"} <= set(queried)


def test_compose_mounts_the_dashboard_in_its_monitoring_profile():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    assert grafana["profiles"] == prometheus["profiles"] == ["monitoring"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["api:8000"]


def test_compose_offers_rabbitmq_in_a_profile_and_passes_the_broker_url_on():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert compose["services"]["worker"]["environment"]["INGOT_BROKER_URL"] == "${INGOT_BROKER_URL:-}"
