"""The served evaluation that ends a job with validation rows: the runner asks its own server's /eval.

The runner holds no model. It sends the job's validation rows to the server it belongs to, over
loopback and with the server's key, exactly as a user would: the generation worker loads the new
adapter (so the first request after ``succeeded`` is an adapter-cache hit) and answers every row with
the adapter and the base in mixed batches. The job stores ``{adapter: metrics, base: metrics, rows,
max_new_tokens}``; anything that stops the evaluation becomes a warning and ``eval: null``, never a
failed job: the adapter is already published and usable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings

MIN_EOS_RATE = 0.9  # below this share of answers ending by EOS, the adapter likely rambles on
CONNECT_TIMEOUT_S = 5.0


def loopback_url(settings: Settings) -> str:
    """This server's address as seen from its own host (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def read_rows(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _why(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    return f"POST /eval answered {response.status_code}: {message}"


def served_eval(settings: Settings, adapter: str, val: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(the job's eval report or None, warnings) for ``adapter`` on the validation rows in ``val``."""
    if not settings.serves_generation:
        return None, [
            f"no served evaluation: this server runs with role '{settings.role}' and answers no generation "
            "requests (POST /eval needs role 'all')"
        ]
    headers = {}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    body = {"adapters": [adapter, None], "data": read_rows(val)}
    timeout = httpx.Timeout(settings.request_timeout + 30.0, connect=CONNECT_TIMEOUT_S)
    try:
        r = httpx.post(f"{loopback_url(settings)}/eval", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return None, [
            f"no served evaluation: the server at {loopback_url(settings)} could not be reached ({exc})"
        ]
    if r.status_code != 200:
        return None, [f"no served evaluation: {_why(r)}"]
    answer = r.json()
    metrics = answer["metrics"]
    report = {
        "adapter": metrics[adapter],
        "base": metrics["base"],
        "max_new_tokens": answer["max_new_tokens"],
        "rows": [
            {
                "index": row["index"],
                "reference": row["reference"],
                "adapter": row["outputs"][adapter]["text"],
                "base": row["outputs"]["base"]["text"],
            }
            for row in answer["rows"]
        ],
    }
    if any("rejected" in row for row in answer["rows"]):
        # DPO validation rows: is the adapter's answer nearer the chosen one (ROUGE-L) than the base's?
        from trainer.metrics import rouge_l

        for out, row in zip(report["rows"], answer["rows"], strict=True):
            if "rejected" in row:
                out["rejected"] = row["rejected"]
                out["closer_to_chosen"] = rouge_l(out["adapter"], row["reference"]) > rouge_l(
                    out["base"], row["reference"]
                )
        closer = [r["closer_to_chosen"] for r in report["rows"] if "closer_to_chosen" in r]
        report["closer_to_chosen_rate"] = sum(closer) / len(closer)
    return report, eos_warnings(report)


def eos_warnings(report: dict[str, Any]) -> list[str]:
    """An adapter that ends fewer answers by EOS than the base, or than ``MIN_EOS_RATE``, is flagged.

    Every training reference ends with EOS (the trainer appends it), so a trained adapter should stop.
    """
    ours, base = report["adapter"]["eos_rate"], report["base"]["eos_rate"]
    out = []
    if ours < base:
        out.append(
            f"the adapter ended {ours:.0%} of its validation answers with EOS, "
            f"fewer than the base's {base:.0%}"
        )
    if ours < MIN_EOS_RATE:
        out.append(
            f"the adapter ended only {ours:.0%} of its validation answers with EOS "
            f"(below {MIN_EOS_RATE:.0%}) although every reference ends with EOS: "
            "answers run on to max_new_tokens"
        )
    return out
