"""Writes the Grafana dashboard deploy/grafana/dashboards/loraserve.json.

The JSON is generated so that panels stay laid out on Grafana's 24-column grid and ids stay unique;
edit the panel list here and run `python scripts/build_dashboard.py`. A test checks that the
committed file is what this script writes, and scripts/check_dashboards.py checks every query.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "loraserve.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every query is limited to the instances chosen in the dashboard's "instance" variable.
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
# API traffic only: probes and scrapes would dilute the error share (as in the alert rule).
API = 'endpoint!~"/health|/health/ready|/metrics"'


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    # legend -> unit, for a series whose unit differs from the panel's
    unit_overrides: dict[str, str] = field(default_factory=dict)


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile for each q, optionally split by one label."""
    group = f"le, {by}" if by else "le"
    out = []
    for q in qs:
        expr = f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))"
        legend = f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append((expr, legend))
    return out


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Serving",
        [
            Panel(
                "Request rate by endpoint and status",
                [
                    (
                        f"sum by (endpoint, status) (rate(loraserve_requests_total{{{SEL}}}[{RATE}]))",
                        "{{endpoint}} {{status}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Server errors (5xx share of API requests)",
                # `or vector(0)`: no 5xx series at all means a share of 0, not "no data".
                [
                    (
                        f'(sum(rate(loraserve_requests_total{{{SEL}, {API}, status=~"5.."}}[{RATE}]))'
                        " or vector(0)) / "
                        f"sum(rate(loraserve_requests_total{{{SEL}, {API}}}[{RATE}]))",
                        "5xx share",
                    )
                ],
                unit="percentunit",
            ),
            Panel(
                "Request latency percentiles",
                quantiles("loraserve_request_duration_seconds", by="endpoint"),
                unit="s",
            ),
            Panel(
                "Time to first token",
                quantiles("loraserve_time_to_first_token_seconds"),
                unit="s",
                description="From arrival to the first generated token, all adapters.",
            ),
            Panel(
                "Generated tokens/s by adapter",
                [
                    (
                        f"sum by (adapter) (rate(loraserve_generated_tokens_total{{{SEL}}}[{RATE}]))",
                        "{{adapter}}",
                    )
                ],
                unit="short",
            ),
            Panel(
                "Prompt tokens/s by adapter",
                [(f"sum by (adapter) (rate(loraserve_prompt_tokens_total{{{SEL}}}[{RATE}]))", "{{adapter}}")],
                unit="short",
            ),
            Panel("Inter-token latency", quantiles("loraserve_inter_token_latency_seconds"), unit="s"),
            Panel(
                "Batch size (rows per decode step)",
                [
                    (
                        f"sum(rate(loraserve_batch_size_sum{{{SEL}}}[{RATE}])) / "
                        f"sum(rate(loraserve_batch_size_count{{{SEL}}}[{RATE}]))",
                        "mean",
                    ),
                    *quantiles("loraserve_batch_size", qs=(0.5, 0.95)),
                ],
                unit="short",
            ),
            Panel(
                "Queue wait",
                quantiles("loraserve_queue_wait_seconds", qs=(0.5, 0.95, 0.99)),
                unit="s",
                description="From arrival to joining a batch.",
            ),
            Panel(
                "Prefix cache",
                [
                    (
                        f"sum(rate(loraserve_prefix_cache_hits_total{{{SEL}}}[{RATE}])) / "
                        f"sum(rate(loraserve_prefix_cache_queries_total{{{SEL}}}[{RATE}]))",
                        "hit ratio (prompt tokens)",
                    ),
                    (f"max(loraserve_prefix_cache_bytes{{{SEL}}})", "bytes held"),
                ],
                unit="percentunit",
                unit_overrides={"bytes held": "bytes"},
                description="Share of looked-up prompt tokens whose KV came from the prefix cache "
                "(--prefix-cache on), and what its blocks hold of the KV budget.",
            ),
        ],
    ),
    (
        # The model-server protocol gauges the Inference Gateway's endpoint picker routes on.
        "Routing (Inference Gateway gauges)",
        [
            Panel(
                "Requests running and waiting",
                [
                    (f"sum by (instance) (loraserve_num_requests_running{{{SEL}}})", "running {{instance}}"),
                    (f"sum by (instance) (loraserve_num_requests_waiting{{{SEL}}})", "waiting {{instance}}"),
                ],
                unit="short",
                width=8,
            ),
            Panel(
                "KV cache usage",
                [(f"max by (instance) (loraserve_kv_cache_usage_perc{{{SEL}}})", "{{instance}}")],
                unit="percentunit",
                width=8,
                description="Tokens in the KV slots of running rows over batch rows x context length.",
            ),
            Panel(
                "Adapters running and waiting",
                [
                    (
                        f"topk by (instance) (1, loraserve_lora_requests_info{{{SEL}}})",
                        "{{instance}} running=[{{running_lora_adapters}}] "
                        "waiting=[{{waiting_lora_adapters}}] max={{max_lora}}",
                    )
                ],
                kind="stat",
                width=8,
                description="loraserve_lora_requests_info of each instance: one series, the adapters "
                "running and waiting now (its value is the time of the update).",
            ),
        ],
    ),
    (
        "Adapters",
        [
            Panel(
                "Adapters loaded",
                [
                    (f"sum by (instance) (loraserve_num_loaded_lora_adapters{{{SEL}}})", "{{instance}}"),
                    (
                        f"max by (instance) (loraserve_max_loaded_lora_adapters{{{SEL}}})",
                        "limit {{instance}}",
                    ),
                    (
                        f'count by (instance) (loraserve_lora_adapter_loaded{{pinned="true", {SEL}}})',
                        "pinned {{instance}}",
                    ),
                ],
                unit="short",
                width=8,
                description="Adapter versions resident in each worker's cache, its capacity "
                "(--max-loaded-adapters) and how many of them are pinned.",
            ),
            Panel(
                "Adapter load latency",
                quantiles("loraserve_lora_adapter_load_seconds", qs=(0.5, 0.95)),
                unit="s",
                width=8,
            ),
            Panel(
                "Adapter cache hit ratio",
                [
                    (
                        f"sum(rate(loraserve_adapter_cache_hits_total{{{SEL}}}[{RATE}])) / "
                        f"(sum(rate(loraserve_adapter_cache_hits_total{{{SEL}}}[{RATE}])) + "
                        f"sum(rate(loraserve_adapter_cache_misses_total{{{SEL}}}[{RATE}])))",
                        "hit ratio",
                    ),
                    (f"sum(rate(loraserve_adapter_cache_evictions_total{{{SEL}}}[{RATE}]))", "evictions/s"),
                ],
                unit="percentunit",
                width=8,
                unit_overrides={"evictions/s": "short"},
            ),
            Panel(
                "Resident adapters",
                [
                    (
                        f"loraserve_lora_adapter_loaded{{{SEL}}}",
                        "{{instance}} {{adapter_name}} r={{rank}} pinned={{pinned}}",
                    )
                ],
                kind="stat",
                width=24,
                description="loraserve_lora_adapter_loaded: one series per adapter version in a worker's "
                "cache (1 while resident), what routers score residency on.",
            ),
        ],
    ),
    (
        "Training",
        [
            Panel(
                "Training jobs by status",
                [(f"sum by (status) (loraserve_train_jobs{{{SEL}}})", "{{status}}")],
                unit="short",
                width=8,
            ),
            Panel(
                "Training jobs finished (per hour)",
                [
                    (
                        f"sum by (status) (increase(loraserve_train_jobs_finished_total{{{SEL}}}[1h]))",
                        "{{status}}",
                    )
                ],
                unit="short",
                width=8,
            ),
            Panel(
                "Training loss", [(f"loraserve_train_loss{{{SEL}}}", "{{instance}}")], unit="short", width=8
            ),
            Panel(
                "Training throughput",
                [
                    (f"loraserve_train_tokens_per_second{{{SEL}}}", "tokens/s {{instance}}"),
                    (f"sum(rate(loraserve_train_steps_total{{{SEL}}}[{RATE}]))", "steps/s"),
                ],
                unit="short",
            ),
            Panel(
                "Training job duration",
                quantiles("loraserve_train_job_duration_seconds", qs=(0.5, 0.95)),
                unit="s",
            ),
        ],
    ),
    (
        "GPU and model",
        [
            Panel(
                "GPU memory of the generation worker",
                [(f"sum by (instance, kind) (loraserve_gpu_memory_bytes{{{SEL}}})", "{{kind}} {{instance}}")],
                unit="bytes",
                width=16,
            ),
            Panel(
                "Model served",
                [
                    (
                        f"max by (instance, model, device, dtype, weights) (loraserve_model_info{{{SEL}}})",
                        "{{model}} {{device}} {{dtype}} weights={{weights}}",
                    )
                ],
                kind="stat",
                width=8,
                description="weights=random means the base model was NOT loaded from real weights.",
            ),
        ],
    ),
]


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    options: dict
    if panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "name",
            "colorMode": "none",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        }
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": panel.unit},
            "overrides": [
                {"matcher": {"id": "byName", "options": name}, "properties": [{"id": "unit", "value": unit}]}
                for name, unit in panel.unit_overrides.items()
            ],
        },
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "range": True,
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def build() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel_json(panel, pid, x, y))
            pid, x, row_h = pid + 1, x + panel.width, max(row_h, panel.height)
        y += row_h
    return {
        "uid": "loraserve",
        "title": "loraserve",
        "description": "LoRA serving and training: traffic, latency, batching, adapters, jobs, GPU memory",
        "tags": ["loraserve"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "loraserve-prometheus"},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": "label_values(loraserve_requests_total, instance)",
                        "refId": "instance",
                    },
                    "definition": "label_values(loraserve_requests_total, instance)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": ["All"], "value": ["$__all"]},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                    "regex": "",
                    "options": [],
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(args.out)


if __name__ == "__main__":
    main()
