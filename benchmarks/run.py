"""Run the benchmark suite and write SUMMARY.md (the same as ``cellfoundry bench``).

    python benchmarks/run.py --quick                 # one small run per task, < 10 min, 2 cores
    python benchmarks/run.py --summary-only          # regenerate results/SUMMARY.md and charts
    python benchmarks/run.py --tasks niche grn       # the full runs of two tasks (hours on CPU)

Which script and arguments each task and tier uses: ``cellfoundry.bench.suite.STEPS``.
"""

from __future__ import annotations

import argparse
import sys

from cellfoundry.bench.suite import add_arguments, run_from_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
