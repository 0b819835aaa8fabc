"""Results JSON -> summary rows, one extractor per benchmark (keyed by the file's stem).

Each family of benchmarks has its own module; an extractor takes the parsed JSON and the file
name and returns :class:`cellfoundry.bench.rows.SummaryRow` objects, reading only what the
benchmark recorded (no number is computed here that the benchmark did not measure, except
means, sds and across-seed intervals of its per-seed values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellfoundry.bench.rows import SummaryRow

Extractor = Callable[[dict[str, Any], str], list[SummaryRow]]


def extractors() -> dict[str, Extractor]:
    """Every known extractor by results-file stem (``encoder_throughput_cpu`` etc.)."""
    from cellfoundry.bench.extract import finetuning, science, speed

    found: dict[str, Extractor] = {}
    for module in (finetuning, science, speed):
        found.update(module.EXTRACTORS)
    return found
