"""Model card of a fine-tuned task model: what it predicts, how it was trained, how it scores.

The metric rows (``config.metrics["rows"]``) are the test-split figures the runner measured
beside the baselines it ran on the same split; a row where a baseline wins says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellfoundry._io import atomic_write_text


def comparison_rows(
    task: str, scores: dict[str, Any], label: Any = lambda metric: metric
) -> list[dict[str, Any]]:
    """Card rows from a task's test scores: one per entry of ``scores["comparison"]``, the
    model's value beside the best baseline's, the difference and its interval.

    ``scores`` holds ``model`` and ``baselines`` (metric -> value) and ``comparison``
    (metric -> best_baseline, difference, ci95, verdict), as every task's ``score_test``
    writes them; ``label`` names a metric in the card.
    """
    rows = []
    for metric, comparison in scores["comparison"].items():
        best, (low, high) = comparison["best_baseline"], comparison["ci95"]
        rows.append(
            {
                "task": task,
                "metric": label(metric),
                "ours": round(scores["model"][metric], 4),
                "baseline": best,
                "baseline_value": round(scores["baselines"][best][metric], 4),
                "difference": f"{comparison['difference']:+.4f}",
                "ci": f"({low:+.4f} to {high:+.4f}; {comparison['verdict']})",
            }
        )
    return rows


def render_task_card(config: Any, name: str) -> str:
    """Card text: YAML metadata (huggingface_hub's format), then a Markdown body."""
    from huggingface_hub import ModelCardData

    from cellfoundry.bench.cards import rows_for, summary_table
    from cellfoundry.hub import _metrics_table

    metrics = config.metrics or {}
    data = ModelCardData(
        library_name="cellfoundry",
        base_model=config.base_model,
        tags=["cellfoundry", "single-cell", config.task, config.tuning],
        license=metrics.get("license", "other"),
    )
    labels = getattr(config, "labels", None)
    label_line = f"\n\nLabels ({len(labels)}): {', '.join(labels)}." if labels else ""
    batches = getattr(config, "batches", None)
    if batches:
        label_line += f" Trained to remove batches ({len(batches)}): {', '.join(batches)}."
    training = metrics.get("training", "not recorded")
    body = f"""
# {name}

A `{config.task}` model fine-tuned from `{config.base_model}` ({config.tuning}, pooling
`{config.pooling}`).{label_line}

## How to load

```python
from cellfoundry.tasks import load_task_model, predict

model = load_task_model("{name}")
predict(adata, model)  # writes the predictions into adata
```

or `cellfoundry predict cells.h5ad out.h5ad --model {name}`.

## Training

{training}

## Metrics beside baselines (test split)

{_metrics_table(metrics.get("rows", []))}

## The base model on this task in the benchmark summary

Rows of `benchmarks/results/SUMMARY.md` for `{config.base_model}` on `{config.task}` (the
benchmark's own data and splits, not this model's):

{summary_table(rows_for(config.base_model, config.task))}

## Limitations

Fine-tuned on one dataset's training split; figures hold for its test split only. Compare
with the baselines on your own data before relying on it.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_task_card(model: Any, folder: str | Path) -> Path:
    """Write ``README.md`` for a task model folder (atomically)."""
    folder = Path(folder)
    return atomic_write_text(folder / "README.md", render_task_card(model.config, folder.name))
