"""Checks Grafana dashboards and Prometheus rule files against the metrics the service exports.

    python scripts/check_dashboards.py [--rules deploy/prometheus/rules.yml] deploy/grafana/dashboards/*.json

For every dashboard: the JSON has Grafana's shape (unique panel ids, panels on the 24-column grid,
targets with unique refIds and a datasource the dashboard defines); every query parses as PromQL
(promtool, after Grafana's variables are replaced by plain values); every metric a query names is
one that service/metrics.py exports, in the form Prometheus sees it (counters `_total`, histograms
`_bucket/_sum/_count`), and every label a query filters or groups by exists on those metrics.
Rule files get the same name and label checks (promtool check rules parses them).
Exit status 0 when everything holds, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

# Labels Prometheus adds to every scraped series, and the one histograms carry on `_bucket`.
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus itself writes for each target.
SYNTHETIC = {
    name: TARGET_LABELS
    for name in ("up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added")
}
AGGREGATORS = frozenset(
    ("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk")
    + ("quantile", "limitk", "limit_ratio")
)
KEYWORDS = frozenset(
    ("and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right")
    + ("inf", "nan")
)
# Grafana's built-in interval variables, replaced by a plain duration before parsing.
INTERVAL_VARS = ("$__rate_interval", "$__interval_ms", "$__interval", "$__range_s", "$__range_ms", "$__range")

_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_SELECTOR = re.compile(rf"({_IDENT})?\s*\{{([^}}]*)\}}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z.]+")
_NUMBER = re.compile(r"(?<![a-zA-Z0-9_:])\d[0-9.eE+-]*[a-z]*")
_TOKEN = re.compile(_IDENT)


@dataclass(frozen=True)
class Query:
    where: str  # e.g. "loraserve.json panel 4 'Request latency percentiles' A"
    expr: str


def exported_metrics(module: str = "service.metrics") -> dict[str, frozenset[str]]:
    """Sample name -> label names, for every metric the module defines, as Prometheus scrapes them.

    Multiprocess mode exports no `_created` samples and no default process/platform collectors.
    """
    from prometheus_client.metrics import MetricWrapperBase

    mod = importlib.import_module(module)
    status_gauge = getattr(mod, "StatusGauge", None)  # gauges read from the worker's status file
    out: dict[str, frozenset[str]] = {}
    for value in vars(mod).values():
        if status_gauge is not None and isinstance(value, status_gauge):
            out[value.name] = frozenset(value.labelnames)
            continue
        if not isinstance(value, MetricWrapperBase):
            continue
        name, labels, kind = value._name, frozenset(value._labelnames), value._type
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = labels
            out[f"{name}_count"] = labels
        elif kind == "summary":
            out[name] = labels | {"quantile"}
            out[f"{name}_sum"] = labels
            out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


def substitute_variables(expr: str, variables: Iterable[str] = ()) -> str:
    """Grafana variables -> values PromQL accepts: intervals become 1m, other variables `.*`."""
    for var in INTERVAL_VARS:
        expr = expr.replace(var, "1m")
    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", ".*", expr)
    return expr


def referenced(expr: str) -> tuple[list[str], list[tuple[str | None, set[str]]], set[str]]:
    """(metric names, [(metric or None, labels in its matchers)], labels in grouping clauses)."""
    text = _STRING.sub('""', expr)
    selectors: list[tuple[str | None, set[str]]] = []

    def _selector(m: re.Match[str]) -> str:
        name = m.group(1)
        selectors.append((name, set(_MATCHER_LABEL.findall(m.group(2)))))
        return f" {name} " if name else " "

    text = _SELECTOR.sub(_selector, text)
    grouping: set[str] = set()

    def _group(m: re.Match[str]) -> str:
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
        return " "

    text = _GROUPING.sub(_group, text)
    text = _RANGE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names: list[str] = []
    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if token in KEYWORDS or token in AGGREGATORS or text[m.end() :].lstrip().startswith("("):
            continue  # a keyword, an aggregation or a function call
        names.append(token)
    return names, selectors, grouping


def check_names(query: Query, catalogue: dict[str, frozenset[str]]) -> list[str]:
    """Problems with the metric and label names one query uses."""
    names, selectors, grouping = referenced(query.expr)
    problems = []
    if not names:
        problems.append(f"{query.where}: names no metric: {query.expr}")
    for name in names:
        if name not in catalogue:
            problems.append(f"{query.where}: metric {name!r} is not exported by the service")
    for name, labels in selectors:
        if name is None or name not in catalogue:
            continue
        unknown = labels - catalogue[name] - TARGET_LABELS - {"__name__"}
        if unknown:
            problems.append(f"{query.where}: {name} has no label(s) {sorted(unknown)}")
    known_labels = set(TARGET_LABELS).union(*(catalogue.get(n, frozenset()) for n in names))
    unknown_grouping = grouping - known_labels
    if unknown_grouping and all(n in catalogue for n in names):
        problems.append(f"{query.where}: groups by label(s) {sorted(unknown_grouping)} no metric here has")
    return problems


def promtool_parse(queries: list[Query], promtool: str = "promtool") -> list[str]:
    """Parses every expression with promtool, as recording rules in a throw-away rules file."""
    if not queries:
        return []
    groups = [
        {"name": f"q{i}", "rules": [{"record": "dashboard_check", "expr": q.expr}]}
        for i, q in enumerate(queries)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        proc = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
    if proc.returncode == 0:
        return []
    problems = []
    output = proc.stdout + proc.stderr
    for m in re.finditer(r'group "q(\d+)", rule \d+, "dashboard_check": (.*)', output):
        q = queries[int(m.group(1))]
        problems.append(f"{q.where}: {m.group(2)} in: {q.expr}")
    return problems or [f"promtool check rules failed: {output.strip()}"]


def dashboard_queries(dashboard: dict, label: str) -> list[Query]:
    """Every PromQL expression of every panel (rows' nested panels included), variables replaced."""
    variables = [v.get("name", "") for v in dashboard.get("templating", {}).get("list", [])]
    out = []
    for panel in _all_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                where = f"{label} panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}"
                out.append(Query(where, substitute_variables(expr, variables)))
    return out


def _all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def check_structure(dashboard: dict, label: str) -> list[str]:
    """Grafana's dashboard model: what a provisioned dashboard needs to load and draw."""
    problems = []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"{label}: no {key!r}")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    seen_ids: set[int] = set()
    for panel in _all_panels(dashboard):
        pid, title = panel.get("id"), panel.get("title")
        where = f"{label} panel {pid} {title!r}"
        if not isinstance(pid, int) or pid in seen_ids:
            problems.append(f"{where}: id missing or repeated")
        seen_ids.add(pid)
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")):
            problems.append(f"{where}: gridPos needs integer h, w, x, y")
        elif grid["x"] < 0 or grid["w"] < 1 or grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: does not fit Grafana's 24-column grid")
        if panel.get("type") == "row":
            continue
        if not title:
            problems.append(f"{where}: no title")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no queries")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or None in ref_ids:
            problems.append(f"{where}: refIds missing or repeated: {ref_ids}")
        for source in [panel.get("datasource")] + [t.get("datasource") for t in targets]:
            problems.extend(_check_datasource(source, variables, where))
    return problems


def _check_datasource(source: object, variables: dict[str, dict], where: str) -> list[str]:
    if source is None:
        return [f"{where}: no datasource"]
    if not isinstance(source, dict) or source.get("type") != "prometheus":
        return [f"{where}: datasource is not Prometheus: {source!r}"]
    uid = str(source.get("uid", ""))
    m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
    if m:
        var = variables.get(m.group(1) or m.group(2))
        if var is None or var.get("type") != "datasource" or var.get("query") != "prometheus":
            return [f"{where}: datasource variable {uid} is not a Prometheus datasource variable"]
    return []


def check_variable_queries(dashboard: dict, label: str, catalogue: dict[str, frozenset[str]]) -> list[str]:
    problems = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = re.fullmatch(r"\s*label_values\(\s*(" + _IDENT + r")\s*,\s*(\w+)\s*\)\s*", text)
        if not m:
            problems.append(f"{label} variable {var.get('name')!r}: want label_values(metric, label): {text}")
            continue
        metric, lab = m.groups()
        if metric not in catalogue:
            problems.append(f"{label} variable {var.get('name')!r}: metric {metric!r} is not exported")
        elif lab not in catalogue[metric] | TARGET_LABELS:
            problems.append(f"{label} variable {var.get('name')!r}: {metric} has no label {lab!r}")
    return problems


def rule_queries(path: Path) -> tuple[list[Query], dict[str, frozenset[str]]]:
    """Expressions of a rules file, and the series its recording rules define (name -> labels)."""
    doc = yaml.safe_load(path.read_text())
    queries, recorded = [], {}
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("record") or rule.get("alert")
            queries.append(Query(f"{path.name} {group.get('name')} {name}", rule["expr"]))
            if "record" in rule:
                recorded[rule["record"]] = frozenset()
    return queries, recorded


def check(dashboards: list[Path], rules: list[Path], promtool: str, module: str) -> list[str]:
    catalogue = {**exported_metrics(module), **SYNTHETIC}
    problems: list[str] = []
    all_queries: list[Query] = []
    for path in dashboards:
        try:
            dashboard = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: not readable JSON: {exc}")
            continue
        problems += check_structure(dashboard, path.name)
        problems += check_variable_queries(dashboard, path.name, catalogue)
        queries = dashboard_queries(dashboard, path.name)
        if not queries:
            problems.append(f"{path.name}: no queries")
        all_queries += queries
    rule_sets = [rule_queries(path) for path in rules]
    for _, recorded in rule_sets:
        # A recording rule's series carry the labels of what it aggregates; allow those.
        for name in recorded:
            catalogue[name] = frozenset().union(*(v for k, v in catalogue.items() if k != name))
    for queries, _ in rule_sets:
        all_queries += queries
    for query in all_queries:
        problems += check_names(query, catalogue)
    problems += promtool_parse(all_queries, promtool)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check dashboards and rule files against the service's metrics"
    )
    parser.add_argument("dashboards", nargs="*", type=Path)
    parser.add_argument("--rules", action="append", type=Path, default=[], help="Prometheus rules file")
    parser.add_argument("--promtool", default="promtool")
    parser.add_argument("--metrics-module", default="service.metrics")
    args = parser.parse_args(argv)
    if shutil.which(args.promtool) is None:
        print(f"error: {args.promtool} not found (Debian: apt-get install prometheus)", file=sys.stderr)
        return 2
    problems = check(args.dashboards, args.rules, args.promtool, args.metrics_module)
    for problem in problems:
        print(problem)
    checked = ", ".join(str(p) for p in [*args.dashboards, *args.rules])
    print(f"{'FAILED' if problems else 'OK'}: {len(problems)} problem(s) in {checked}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
