"""One row of the benchmark summary: a metric of ours beside the best baseline of the same run.

Every results JSON in ``benchmarks/results/`` has its own shape (each benchmark records what it
measured); the extractors in :mod:`cellfoundry.bench.extract` turn each into these rows, which
``SUMMARY.md``, ``summary.json``, the charts and the model cards all read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

VERDICTS = ("better", "worse", "no difference", "target met", "target missed", "measured")


@dataclass
class SummaryRow:
    """A metric of ours against the best baseline (quality) or a peer / target (speed).

    ``ours`` / ``baseline`` are means over seeds, ``*_sd`` their sd across seeds (0 for one
    seed). ``difference`` is ours minus baseline (mean of per-seed paired differences);
    ``ci95`` its 95% interval: across seeds (t interval) when there are several, else the
    run's own paired bootstrap. ``verdict`` reads the interval in the metric's direction.
    ``source`` is the results file (e.g. ``grn.json``); ``command`` reproduces it.
    """

    task: str
    setting: str
    metric: str
    higher_is_better: bool
    ours: float
    model: str
    source: str
    command: str
    ours_sd: float = 0.0
    best_baseline: str | None = None
    baseline: float | None = None
    baseline_sd: float | None = None
    difference: float | None = None
    ci95: list[float] | None = None
    n_seeds: int = 1
    verdict: str = "measured"
    per_seed: list[str] = field(default_factory=list)  # per-seed verdicts, where recorded
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interval_verdict(ci95: list[float] | None, higher_is_better: bool) -> str:
    """better / worse when the 95% interval of ours minus baseline excludes 0, else no
    difference (``measured`` when there is no interval)."""
    if ci95 is None or not all(np.isfinite(ci95)):
        return "measured"
    low, high = ci95
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "no difference"


def seed_interval(differences: list[float]) -> tuple[float, list[float] | None]:
    """Mean of per-seed differences and its 95% t interval across seeds (None for one seed)."""
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    half = float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return mean, [mean - half, mean + half]


def compare_over_seeds(
    ours: list[float],
    baseline: list[float],
    higher_is_better: bool,
    run_ci95: list[float] | None = None,
) -> dict[str, Any]:
    """Fields of a row from paired per-seed values of ours and the best baseline.

    With one seed, or when the seeds left the difference unchanged, the run's own bootstrap
    interval (``run_ci95``) is used, if given (else there is no interval).
    """
    ours_arr, base_arr = np.asarray(ours, float), np.asarray(baseline, float)
    differences = ours_arr - base_arr
    difference, ci95 = seed_interval(list(differences))
    # one seed, or seeds that did not change the values (a zero-width interval would call any
    # difference significant): the run's own paired bootstrap is the honest interval
    if ci95 is None or (differences.size > 1 and np.ptp(differences) == 0):
        ci95 = list(run_ci95) if run_ci95 is not None else None
    return {
        "ours": float(ours_arr.mean()),
        "ours_sd": float(ours_arr.std(ddof=1)) if ours_arr.size > 1 else 0.0,
        "baseline": float(base_arr.mean()),
        "baseline_sd": float(base_arr.std(ddof=1)) if base_arr.size > 1 else 0.0,
        "difference": difference,
        "ci95": ci95,
        "n_seeds": int(ours_arr.size),
        "verdict": interval_verdict(ci95, higher_is_better),
    }


def runnable_command(
    script: str,
    recorded: str | None,
    arguments: dict | None = None,
    skip: Sequence[str] = (),
    repeated: dict[str, str] | None = None,
) -> str:
    """The command line that reproduces a results file, as run from the repository root.

    The benchmarks record ``<script>.py <args>`` (a bare script name, no folder): that becomes
    ``python benchmarks/<script>.py <args>``; any other recorded command is kept as it is.
    Without a recorded command (``None``, empty or blank) the command is rebuilt from the
    recorded ``arguments`` (settings) as ``--flag value`` words: keys in ``skip`` (e.g. ``out`` /
    ``work``, the machine's folders), private ``_`` keys, ``None`` / ``False`` values and dict
    values are left out; ``True`` is a bare flag; a list is the flag followed by its items (an
    empty list the bare flag, ``nargs="*"``); a key of ``repeated`` takes the flag it maps to
    once per item (``{"models": "--model"}``: ``--model a --model b``).
    """
    if isinstance(recorded, str) and recorded.strip():
        first = recorded.split()[0]
        if first.endswith(".py") and "/" not in first:
            return f"python benchmarks/{recorded}"
        return recorded
    repeated = repeated or {}
    words = [f"python benchmarks/{script}.py"]
    for key, value in (arguments if isinstance(arguments, dict) else {}).items():
        skipped = key in skip or key.startswith("_") or isinstance(value, dict)
        if skipped or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if key in repeated:
            items = value if isinstance(value, list | tuple) else [value]
            words += [word for item in items for word in (repeated[key], str(item))]
        elif value is True:
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return " ".join(words)
