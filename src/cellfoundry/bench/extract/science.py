"""Rows of the science benchmarks: perturbation response (Kang IFN-beta held-out cluster,
Papalexi unseen knockouts), gene regulatory networks (unsupervised scores and the supervised
pair classifier) and spatial niches.

These benchmarks record, per run, ours, every baseline and a comparison with the best baseline
of that run (a paired bootstrap). A row pairs ours with one baseline seed by seed: the baseline
the runs named best most often (the runs may disagree; the note says so), so that the interval
across seeds compares like with like. Where a seed holds several compared units (three
held-out clusters, six held-out knockouts) the seed's value is the mean over its units: cluster
labels are re-derived per seed and held-out knockouts are drawn per seed, so units cannot be
matched across seeds, only seeds can. The unsupervised GRN comparison is the exception (see
:func:`_grn_unsupervised_rows`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellfoundry.bench.extract import Extractor, readable
from cellfoundry.bench.rows import (
    SummaryRow,
    compare_over_seeds,
    interval_verdict,
    runnable_command,
)
from cellfoundry.evaluation.grn import GRN_METRICS
from cellfoundry.evaluation.perturbation import LOWER_IS_BETTER as _PERTURBATION_LOWER

Report = dict[str, Any]

# Metrics where lower is better: the perturbation distances and the niche regressions' MSE.
LOWER_IS_BETTER = frozenset(_PERTURBATION_LOWER) | {"mse"}
GRN_DATASETS = {"kang": "Kang PBMC", "liao": "Liao BALF", "dlpfc": "DLPFC Visium"}
# Names of the model's own GRN scores in grn.json (everything else there is a baseline).
GRN_MODEL_METHODS = ("attention", "embedding", "deletion")
# The supervised pair classifier is trained and scored on this gold standard (benchmarks/grn.py).
GRN_SUPERVISED_GOLD = "DoRothEA A-C"
NICHE_CONTEXTS = {"own": "own", "neighbours": "+ neighbours"}


@dataclass(frozen=True)
class _Origin:
    """What every row of one results file shares."""

    source: str
    model: str
    command: str


@dataclass(frozen=True)
class _Unit:
    """One compared unit of a run (a seed, or a seed's held-out cluster / knockout): ours,
    every baseline there, and the run's own comparison with its best baseline."""

    seed: Any
    label: str
    ours: float
    baselines: dict[str, float]
    best: str | None = None
    ci95: list[float] | None = None
    verdict: str | None = None


def _number(value: Any) -> float | None:
    """A finite float, else None (NaN from json, lists such as per-type Pearson, strings)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sd across seeds (ddof 1; 0 for one seed), as :func:`compare_over_seeds`."""
    array = np.asarray(values, float)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def _origin(report: Report, source: str, script: str) -> _Origin:
    settings = report.get("settings") or {}
    command = (report.get("environment") or {}).get("command")
    return _Origin(
        source,
        str(settings.get("model", "")),
        runnable_command(script, command, settings, skip=("out", "work")),
    )


def _model_note(origin: _Origin) -> list[str]:
    return [] if origin.model else ["base model not recorded in the file's settings"]


def _counted(names: Iterable[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in Counter(names).most_common())


def _by_seed(units: list[_Unit]) -> dict[Any, list[_Unit]]:
    grouped: dict[Any, list[_Unit]] = {}
    for unit in units:
        grouped.setdefault(unit.seed, []).append(unit)
    return grouped


def _units_per_seed(units: list[_Unit]) -> int | None:
    """How many units each seed holds, when every seed holds as many."""
    sizes = {len(group) for group in _by_seed(units).values()}
    return sizes.pop() if len(sizes) == 1 else None


def _seed_means(groups: dict[Any, list[_Unit]], value: Callable[[_Unit], float]) -> list[float]:
    return [float(np.mean([value(u) for u in group])) for group in groups.values()]


def _chosen_baseline(
    units: list[_Unit], higher_is_better: bool, unit_name: str
) -> tuple[str | None, list[str]]:
    """The baseline the runs named best most often, among those with a value in every unit;
    without a recorded one, the baseline with the best mean over seeds."""
    usable = [
        name
        for name in units[0].baselines
        if all(_number(u.baselines.get(name)) is not None for u in units)
    ]
    recorded = [u.best for u in units if u.best is not None]
    notes = []
    if recorded:
        ranked = [name for name, _ in Counter(recorded).most_common() if name in usable]
        if ranked:
            if len(set(recorded)) > 1:
                notes.append(
                    f"best baseline per {unit_name}: {_counted(recorded)}; paired with "
                    f"{ranked[0]} throughout"
                )
            if ranked[0] != Counter(recorded).most_common(1)[0][0]:
                notes.append(
                    f"the most often named best baseline lacks a value in some {unit_name}s"
                )
            return ranked[0], notes
    if not usable:
        return None, [f"no baseline has a value in every {unit_name}"]
    groups = _by_seed(units)
    sign = 1.0 if higher_is_better else -1.0
    best = max(usable, key=lambda b: sign * np.mean(_seed_means(groups, lambda u: u.baselines[b])))
    notes.append("no best baseline recorded; the baseline with the best mean over seeds")
    return best, notes


def _compared_row(
    task: str,
    setting: str,
    metric: str,
    units: list[_Unit],
    origin: _Origin,
    notes: list[str],
    unit_name: str = "seed",
) -> SummaryRow | None:
    """Ours against the chosen baseline, paired per seed (a seed's value: the mean over its
    units, each a ``unit_name``); units where ours is not a finite number are left out (noted),
    None when none is left."""
    left_out = [u.label for u in units if _number(u.ours) is None]
    if left_out:
        notes = [*notes, f"left out, ours not a finite number: {', '.join(left_out)}"]
        units = [u for u in units if _number(u.ours) is not None]
    if not units:
        return None
    higher = _higher_is_better(metric)
    groups = _by_seed(units)
    ours = _seed_means(groups, lambda u: u.ours)
    best, extra = _chosen_baseline(units, higher, unit_name)
    if best is None:
        mean, sd = _mean_sd(ours)
        fields: dict[str, Any] = {"ours": mean, "ours_sd": sd, "n_seeds": len(ours)}
    else:
        baseline = _seed_means(groups, lambda u: u.baselines[best])
        single = units[0] if len(units) == 1 and units[0].best == best else None
        fields = compare_over_seeds(ours, baseline, higher, single.ci95 if single else None)
        if single is not None and single.ci95 is not None:
            extra.append("one seed: ci95 is the run's paired bootstrap")
        elif len(groups) == 1:
            extra.append("one seed: no interval")
    if len(units) > len(groups):
        size = _units_per_seed(units)
        count = f"{size} " if size is not None else ""
        verdicts = [u.verdict for u in units if u.verdict]
        extra.append(f"per seed: mean over its {count}{unit_name}s")
        if verdicts:
            extra.append(
                f"{unit_name}s (over seeds) vs their own best baseline: better "
                f"{verdicts.count('better')}, no difference {verdicts.count('no difference')}, "
                f"worse {verdicts.count('worse')} (of {len(verdicts)})"
            )
    per_seed = [f"{u.label}: {u.verdict} (vs {u.best})" for u in units if u.verdict]
    return SummaryRow(
        task=task,
        setting=setting,
        metric=metric,
        higher_is_better=higher,
        model=origin.model,
        source=origin.source,
        command=origin.command,
        best_baseline=best,
        per_seed=per_seed,
        note="; ".join([*notes, *extra, *_model_note(origin)]),
        **fields,
    )


def _metric_names(
    entries: Iterable[dict[str, Any]], only: Iterable[str] | None = None
) -> list[str]:
    """Metrics the runs compared with a baseline, in first-seen order (the union over runs);
    without any comparison, the model's numeric metrics (those in ``only``, if given)."""
    entries = list(entries)
    compared = dict.fromkeys(m for e in entries for m in (e.get("comparison") or {}))
    if compared:
        return list(compared)
    measured = dict.fromkeys(
        m for e in entries for m, v in (e.get("model") or {}).items() if _number(v) is not None
    )
    return [m for m in measured if only is None or m in only]


def _values(table: dict[str, Any], metric: str) -> dict[str, float]:
    """method -> its value of ``metric`` (methods without a number left out)."""
    return {
        name: number
        for name, values in table.items()
        if (number := _number((values or {}).get(metric))) is not None
    }


def _unit(seed: Any, label: str, entry: dict[str, Any], metric: str) -> _Unit:
    """A unit from ``model`` / ``baselines`` / ``comparison`` (the shape every finetune task's
    test scores share)."""
    comparison = (entry.get("comparison") or {}).get(metric) or {}
    ci95 = comparison.get("ci95")
    return _Unit(
        seed=seed,
        label=label,
        ours=entry["model"][metric],
        baselines=_values(entry.get("baselines") or {}, metric),
        best=comparison.get("best_baseline"),
        ci95=list(ci95) if ci95 is not None else None,
        verdict=comparison.get("verdict"),
    )


def _per_seed_label(units: list[_Unit], what: str) -> str:
    size = _units_per_seed(units)
    return f"{what} ({size}/seed)" if size is not None else what


@readable("finetune_perturbation")
def _finetune_perturbation(report: Report, source: str) -> list[SummaryRow]:
    """Kang IFN-beta, a held-out cluster's response: one row per perturbation and metric."""
    origin = _origin(report, source, "finetune_perturbation")
    entries: dict[str, list[tuple[dict, dict]]] = {}
    for run in report["runs"]:
        for name, entry in run["metrics"]["perturbations"].items():
            entries.setdefault(name, []).append((run, entry))
    rows = []
    for name, pairs in entries.items():
        for metric in _metric_names(e for _, e in pairs):
            units = [
                _unit(run["seed"], f"seed {run['seed']}, cluster {run['cluster']}", e, metric)
                for run, e in pairs
                if metric in e["model"]
            ]
            notes = ["clusters are re-derived per seed (labels do not match across seeds)"]
            setting = _per_seed_label(units, f"Kang {name}, held-out clusters")
            row = _compared_row(
                "perturbation", setting, metric, units, origin, notes, "held-out cluster"
            )
            if row is not None:
                rows.append(row)
    return rows


@readable("finetune_perturbation_unseen")
def _finetune_perturbation_unseen(report: Report, source: str) -> list[SummaryRow]:
    """Papalexi unseen knockouts: one row per metric over every held-out knockout and seed."""
    origin = _origin(report, source, "finetune_perturbation_unseen")
    pairs = [
        (run, knockout, entry)
        for run in report["runs"]
        for knockout, entry in run["metrics"]["perturbations"].items()
    ]
    rows = []
    for metric in _metric_names(e for _, _, e in pairs):
        units = [
            _unit(run["seed"], f"seed {run['seed']}, {knockout}", e, metric)
            for run, knockout, e in pairs
            if metric in e["model"]
        ]
        notes = [
            "held-out knockouts are drawn per seed",
            # measured 2026-12-05: 26 of the 90 recorded intervals exclude their own estimate
            "the per-knockout verdicts come from the run's percentile bootstrap over cells, "
            "which is biased for these mean-profile metrics (some intervals exclude their own "
            "estimate); the row's interval is across seeds",
        ]
        setting = _per_seed_label(units, "Papalexi THP-1, unseen knockouts")
        row = _compared_row(
            "perturbation", setting, metric, units, origin, notes, "held-out knockout"
        )
        if row is not None:
            rows.append(row)
    return rows


def _grn_unsupervised_rows(datasets: dict[str, Any], origin: _Origin) -> list[SummaryRow]:
    """One row per dataset x gold standard, metric and model method, against the best baseline.

    Here ``difference`` / ``ci95`` are the benchmark's own paired bootstrap over regulators
    (TFs; the seeds' rankings pooled), not an interval across seeds: Pearson and Spearman,
    usually the best baselines, are one deterministic run on every cell, so there is nothing
    to pair seed by seed, and three seeds of cell subsamples would leave out the variation
    that matters (which regulators).
    """
    rows = []
    for name, entry in datasets.items():
        for gold_name, gold in (entry.get("golds") or {}).items():
            methods = gold["methods"]
            comparisons = gold.get("comparisons") or {
                m: {} for m in GRN_MODEL_METHODS if m in methods
            }
            for method, by_metric in comparisons.items():
                runs = methods[method]["runs"]
                metrics = list(by_metric) or [m for m in GRN_METRICS if m in runs[0]]
                for metric in metrics:
                    row = _grn_row(
                        f"{GRN_DATASETS.get(name, name)} / {gold_name}: {method}",
                        metric,
                        runs,
                        methods,
                        by_metric.get(metric) or {},
                        origin,
                    )
                    if row is not None:
                        rows.append(row)
    return rows


def _grn_row(
    setting: str,
    metric: str,
    runs: list[dict[str, Any]],
    methods: dict[str, Any],
    comparison: dict[str, Any],
    origin: _Origin,
) -> SummaryRow | None:
    ours = [_number(r.get(metric)) for r in runs]
    if not ours or any(v is None for v in ours):
        return None
    ours_mean, ours_sd = _mean_sd(ours)
    notes = ["ci95: the run's paired bootstrap over regulators (seeds pooled), not across seeds"]
    best = comparison.get("best_baseline")
    if best is None:
        means = {
            m: np.mean(values)
            for m, v in methods.items()
            if m not in GRN_MODEL_METHODS
            and (values := [_number(r.get(metric)) for r in v["runs"]])
            and all(x is not None for x in values)
        }
        best = max(means, key=means.get) if means else None
        notes = ["no comparison recorded: best baseline by mean, no interval"]
    baseline_runs = (methods.get(best) or {}).get("runs") or [] if best else []
    baseline_values = [_number(r.get(metric)) for r in baseline_runs]
    common = {
        "task": "grn",
        "setting": setting,
        "metric": metric,
        "higher_is_better": True,
        "ours": ours_mean,
        "ours_sd": ours_sd,
        "n_seeds": len(ours),
        "model": origin.model,
        "source": origin.source,
        "command": origin.command,
    }
    if not baseline_values or any(v is None for v in baseline_values):
        return SummaryRow(**common, note="; ".join(["no baseline recorded", *_model_note(origin)]))
    baseline, baseline_sd = _mean_sd(baseline_values)
    if len(baseline_values) == 1:
        notes.append(f"{best}: one run (no seeds)")
    low, high = comparison.get("ci_low"), comparison.get("ci_high")
    ci95 = [float(low), float(high)] if low is not None and high is not None else None
    difference = _number(comparison.get("difference"))
    return SummaryRow(
        **common,
        best_baseline=best,
        baseline=baseline,
        baseline_sd=baseline_sd,
        difference=difference if difference is not None else ours_mean - baseline,
        ci95=ci95,
        verdict=interval_verdict(ci95, True),
        note="; ".join([*notes, *_model_note(origin)]),
    )


def _grn_supervised_rows(
    supervised: dict[str, list[dict[str, Any]]], origin: _Origin, seeds: list[Any] | None
) -> list[SummaryRow]:
    """The pair classifier per dataset and metric, paired per seed with the best baseline of
    the same held-out TFs and test cells."""
    rows = []
    for name, runs in supervised.items():
        if not runs:
            continue
        notes = ["held-out TFs and test cells drawn per seed"]
        if seeds and len(runs) < len(seeds):
            notes.append(f"{len(runs)} of the {len(seeds)} seeds in settings recorded")
        if any(run.get("reused") for run in runs):
            notes.append("some runs reused from an earlier invocation's run folders")
        setting = (
            f"{GRN_DATASETS.get(name, name)} / {GRN_SUPERVISED_GOLD}, held-out TFs: pair classifier"
        )
        rows += _seed_rows("grn", setting, runs, origin, notes, GRN_METRICS)
    return rows


def _seed_rows(
    task: str,
    setting: str,
    runs: list[dict[str, Any]],
    origin: _Origin,
    notes: list[str],
    only: Iterable[str] | None = None,
) -> list[SummaryRow]:
    """One row per compared metric of runs that differ only by seed (one unit per seed)."""
    rows = []
    for metric in _metric_names((run["metrics"] for run in runs), only):
        units = [
            _unit(run["seed"], f"seed {run['seed']}", run["metrics"], metric)
            for run in runs
            if metric in run["metrics"]["model"]
        ]
        row = _compared_row(task, setting, metric, units, origin, list(notes))
        if row is not None:
            rows.append(row)
    return rows


@readable("grn", "grn_supervised")
def _grn(report: Report, source: str) -> list[SummaryRow]:
    """grn.json and grn_supervised.json (``--supervised-only``): the same script and shape."""
    if "datasets" not in report and "supervised" not in report:
        raise KeyError("datasets / supervised")
    origin = _origin(report, source, "grn")
    seeds = (report.get("settings") or {}).get("seeds")
    return [
        *_grn_unsupervised_rows(report.get("datasets") or {}, origin),
        *_grn_supervised_rows(report.get("supervised") or {}, origin, seeds),
    ]


@readable("finetune_niche")
def _finetune_niche(report: Report, source: str) -> list[SummaryRow]:
    """Spatial niches: one row per setting, context (own tokens / plus neighbours) and metric.

    The file keeps settings from earlier invocations; its recorded command and settings are
    the latest one's, so a setting that invocation did not run gets the script's default
    command for that setting instead (its own arguments were not recorded).
    """
    origin = _origin(report, source, "finetune_niche")
    latest = report.get("settings") or {}
    rows = []
    for name, block in report["results"].items():
        runs = block["runs"]
        setting_origin, notes = origin, []
        if block.get("command"):  # recorded per setting since 2026-12-05
            setting_origin = _Origin(
                source,
                block.get("model", origin.model),
                runnable_command("finetune_niche", block["command"]),
            )
        elif name not in (latest.get("settings") or [name]):
            setting_origin = _Origin(
                source, origin.model, f"python benchmarks/finetune_niche.py --settings {name}"
            )
            notes.append(
                "run by an earlier invocation than the recorded command; command: the script's "
                "defaults for this setting; model: the latest invocation's"
            )
        elif not {r["seed"] for r in runs} <= set(latest.get("seeds") or []):
            notes.append("some seeds from an earlier invocation than the recorded command")
        contexts = list(dict.fromkeys(r["context"] for r in runs))
        for context in contexts:
            chosen = [r for r in runs if r["context"] == context]
            setting = f"{name} ({NICHE_CONTEXTS.get(context, context)})"
            rows += _seed_rows("niche", setting, chosen, setting_origin, notes)
    return rows


EXTRACTORS: dict[str, Extractor] = {
    "finetune_perturbation": _finetune_perturbation,
    "finetune_perturbation_unseen": _finetune_perturbation_unseen,
    "grn": _grn,
    "grn_supervised": _grn,
    "finetune_niche": _finetune_niche,
}
