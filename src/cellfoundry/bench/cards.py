"""Model cards carry their rows of the benchmark summary.

``write_summary`` of the repository's results publishes the rows of the shipped models into
the package (``_data/benchmark_summary.json``), so that a card written anywhere, offline, can
embed them: a shipped model's card shows every row measured with it; a fine-tuned model's card
shows the rows of its base model for its task. Rows keep their verdicts: where a baseline won,
the card says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellfoundry._io import atomic_write_text

PACKAGE_SUMMARY = Path(__file__).resolve().parents[1] / "_data" / "benchmark_summary.json"


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of summary rows for a card (setting, metric, ours, baseline, CI)."""
    if not rows:
        return "No benchmark rows are recorded for this model yet."
    lines = [
        "| task | setting | metric | this model | best baseline | baseline | "
        "difference (95% CI) | verdict |",
        "|---|---|---|---:|---|---:|---|---|",
    ]
    for row in rows:
        ci = row.get("ci95")
        interval = f" ({ci[0]:+.3g} to {ci[1]:+.3g})" if ci else ""
        difference = "–" if row.get("difference") is None else f"{row['difference']:+.3g}"
        lines.append(
            f"| {row['task']} | {row['setting']} | {row['metric']} | {_figure(row['ours'])} | "
            f"{row.get('best_baseline') or '–'} | {_figure(row.get('baseline'))} | "
            f"{difference}{interval} | {row['verdict']} |"
        )
    return "\n".join(lines)


def rows_for(
    model: str, task: str | None = None, summary: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Summary rows measured with ``model`` (and ``task``), from ``summary`` or the package."""
    if summary is None:
        if not PACKAGE_SUMMARY.is_file():
            return []
        summary = json.loads(PACKAGE_SUMMARY.read_text())
    name = Path(str(model)).name  # a local path to a shipped model counts as that model
    return [
        row
        for row in summary["rows"]
        if row["model"] == name and (task is None or row["task"] == task)
    ]


def publish(summary: dict[str, Any]) -> list[Path]:
    """Copy the shipped models' rows into the package and re-render their cards."""
    from transformers import AutoConfig

    import cellfoundry.models  # noqa: F401  (registers the model types with AutoConfig)
    from cellfoundry.hub import ModelCardInfo, render_model_card, shipped_models

    shipped = shipped_models()
    kept = {
        "generated_utc": summary["generated_utc"],
        "source": "benchmarks/results/summary.json",
        "rows": [row for row in summary["rows"] if row["model"] in shipped],
    }
    written = [atomic_write_text(PACKAGE_SUMMARY, json.dumps(kept, indent=2) + "\n")]
    for name, folder in sorted(shipped.items()):
        info = ModelCardInfo.load(folder)
        if info is None:
            continue
        card = render_model_card(AutoConfig.from_pretrained(folder), info, name)
        written.append(atomic_write_text(folder / "README.md", card))
    return written
