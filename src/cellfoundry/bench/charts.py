"""PNG charts of the summary rows, for a person to read beside ``SUMMARY.md``.

Per task: a bar chart of ours beside the best baseline (mean ± sd over seeds) and a forest plot
of the difference with its 95% interval, coloured by verdict, one panel per metric (metrics
have different scales, so they never share an axis).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellfoundry.bench.rows import SummaryRow
from cellfoundry.plotting import pyplot, save_figure

COLOURS = {"better": "#1b9e77", "worse": "#d95f02", "no difference": "#7570b3"}
MAX_ROWS_PER_PANEL = 24  # beyond this a panel is unreadable; the table in SUMMARY.md has all


def _compared(rows: list[SummaryRow], with_interval: bool) -> dict[str, list[SummaryRow]]:
    """Rows with a baseline (and a difference, if asked), grouped by metric in first-seen
    order; speed rows have a baseline figure but no difference."""
    by_metric: dict[str, list[SummaryRow]] = {}
    for row in rows:
        if row.baseline is not None and (row.difference is not None or not with_interval):
            by_metric.setdefault(row.metric, []).append(row)
    return {m: r[:MAX_ROWS_PER_PANEL] for m, r in by_metric.items()}


def _panels(groups: dict[str, list[SummaryRow]], per_row: float, minimum: float):
    """A figure with one panel per metric, each as tall as its rows need."""
    plt = pyplot()
    heights = [max(minimum, per_row * len(r) + 1.2) for r in groups.values()]
    figure, axes = plt.subplots(
        len(groups),
        1,
        figsize=(9, sum(heights)),
        dpi=110,
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    return plt, figure, axes


def bar_chart(task: str, rows: list[SummaryRow], path: Path) -> Path | None:
    """Ours vs the best baseline per row, one panel per metric, sd error bars."""
    groups = _compared(rows, with_interval=False)
    if not groups:
        return None
    _, figure, axes = _panels(groups, per_row=0.45, minimum=2.5)
    for axis, (metric, chosen) in zip(axes[:, 0], groups.items(), strict=True):
        y = np.arange(len(chosen))
        ours = [r.ours for r in chosen]
        base = [r.baseline for r in chosen]
        axis.barh(
            y - 0.2,
            ours,
            0.4,
            xerr=[r.ours_sd or 0 for r in chosen],
            label="ours",
            color="#1f78b4",
            capsize=2,
        )
        axis.barh(
            y + 0.2,
            base,
            0.4,
            xerr=[r.baseline_sd or 0 for r in chosen],
            label="best baseline",
            color="#bbbbbb",
            capsize=2,
        )
        axis.set_yticks(y, [f"{r.setting} [{r.best_baseline}]"[:70] for r in chosen], fontsize=7)
        axis.invert_yaxis()
        direction = "higher is better" if chosen[0].higher_is_better else "lower is better"
        axis.set_xlabel(f"{metric} ({direction}); mean ± sd over seeds")
        axis.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_title(f"{task}: ours vs the best baseline of the same run")
    figure.tight_layout()
    return save_figure(figure, path)


def forest_plot(task: str, rows: list[SummaryRow], path: Path) -> Path | None:
    """Ours minus the best baseline with its 95% interval, coloured by verdict."""
    groups = _compared(rows, with_interval=True)
    if not groups:
        return None
    plt, figure, axes = _panels(groups, per_row=0.35, minimum=2.2)
    for axis, (metric, chosen) in zip(axes[:, 0], groups.items(), strict=True):
        for i, row in enumerate(chosen):
            colour = COLOURS.get(row.verdict, "#333333")
            if row.ci95 is not None:
                axis.plot(row.ci95, [i, i], color=colour, linewidth=2)
            axis.plot([row.difference], [i], "o", color=colour)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(chosen)), [r.setting[:70] for r in chosen], fontsize=7)
        axis.invert_yaxis()
        better = "right" if chosen[0].higher_is_better else "left"
        axis.set_xlabel(f"{metric}: ours minus best baseline, 95% CI (ours better to the {better})")
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="-", label=v) for v, c in COLOURS.items()
    ]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="best")
    axes[0, 0].set_title(f"{task}: difference to the best baseline")
    figure.tight_layout()
    return save_figure(figure, path)
