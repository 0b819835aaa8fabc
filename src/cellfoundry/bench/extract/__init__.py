"""Results JSON -> summary rows, one extractor per benchmark (keyed by the file's stem).

Each family of benchmarks has its own module; an extractor takes the parsed JSON and the file
name and returns :class:`cellfoundry.bench.rows.SummaryRow` objects, reading only what the
benchmark recorded (no number is computed here that the benchmark did not measure, except
means, sds and across-seed intervals of its per-seed values).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from cellfoundry.bench.rows import SummaryRow

Extractor = Callable[[dict[str, Any], str], list[SummaryRow]]
READ_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def readable(*benchmarks: str) -> Callable[[Extractor], Extractor]:
    """Turn any failure to read the results of ``benchmarks`` (the names a file may record),
    a file of another benchmark, or an empty result into a ``ValueError`` naming the file, so a
    broken file is never summarised as nothing."""
    names = " or ".join(repr(b) for b in benchmarks)

    def wrap(extract: Extractor) -> Extractor:
        @functools.wraps(extract)
        def run(report: dict[str, Any], source: str) -> list[SummaryRow]:
            if not isinstance(report, dict):
                raise ValueError(f"{source}: not a {names} results file (not a JSON object)")
            recorded = report.get("benchmark")
            if recorded is not None and recorded not in benchmarks:
                raise ValueError(f"{source}: records benchmark {recorded!r}, not {names}")
            try:
                rows = extract(report, source)
            except READ_ERRORS as error:
                raise ValueError(
                    f"{source}: cannot read {names} results ({type(error).__name__}: {error})"
                ) from error
            if not rows:
                raise ValueError(f"{source}: no {names} figures found")
            return rows

        return run

    return wrap


def extractors() -> dict[str, Extractor]:
    """Every known extractor by results-file stem (``encoder_throughput_cpu`` etc.)."""
    from cellfoundry.bench.extract import finetuning, science, speed

    found: dict[str, Extractor] = {}
    for module in (finetuning, science, speed):
        found.update(module.EXTRACTORS)
    return found
