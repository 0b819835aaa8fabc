"""Peak memory of in-silico perturbation against the number of cells and the batch size.

Geneformer's in-silico perturbation is known to run out of memory even at batch 1; ours holds
one batch of unperturbed hidden states and its perturbed copies at a time and writes each unit
of work to disk. Each point is one ``cellfoundry perturb`` process (deleting five genes in a
seeded draw of Kang cells; no target state, whose centroid embedding is a fixed cost),
measured from launch to exit by its peak RSS (``ru_maxrss``); the figure to read is how peak
RSS changes with the cells perturbed at a fixed batch size (it should not grow) and with the
batch size.

    python benchmarks/in_silico_memory.py
    python benchmarks/in_silico_memory.py --cells 50 200 --batch-sizes 4

Writes ``benchmarks/results/in_silico_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pert_kang2018_ifnb_pbmc.h5ad"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "in_silico_memory"
GENES = ["ISG15", "IFI6", "STAT1", "IRF7", "FTL"]


def measure(cells: int, batch_size: int, args) -> dict:
    from cellfoundry._benchmarking import run_measured

    out = args.work / f"cells{cells}-batch{batch_size}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cellfoundry.cli", "perturb", str(args.data), str(out)]
    command += ["--genes", *GENES, "--max-cells", str(cells), "--batch-size", str(batch_size)]
    command += ["--model", args.model]
    command += ["--no-progress", "--overwrite"]
    usage = run_measured(command, args.work / f"cells{cells}-batch{batch_size}.log", "perturb")
    return {
        "cells": cells,
        "batch_size": batch_size,
        "peak_rss_mib": round(usage["maxrss_kib"] / 1024, 1),
        "wall_s": round(usage["wall"], 1),
    }


def markdown(report: dict) -> str:
    lines = [
        "# In-silico perturbation: peak memory vs cells and batch size",
        "",
        f"`cellfoundry perturb` on `{Path(report['settings']['data']).name}` (seeded draw of "
        f"cells), deleting {', '.join(GENES)}, model "
        f"`{report['settings']['model']}`, CPU. One process per row; peak RSS includes "
        "reading the whole .h5ad (the same for every row).",
        "",
        "| cells perturbed | batch size | peak RSS (MiB) | wall (s) |",
        "|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['cells']} | {row['batch_size']} | {row['peak_rss_mib']:,.0f} | "
            f"{row['wall_s']:.0f} |"
        )
    lines += ["", report["verdict"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from cellfoundry._benchmarking import short_environment, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cells", type=int, nargs="+", default=[50, 150, 450])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--model", default="cellfoundry-tiny-bert")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / NAME)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch_size in args.batch_sizes:
        for cells in args.cells:
            rows.append(measure(cells, batch_size, args))
            print(rows[-1], flush=True)
    spread = []
    for batch_size in args.batch_sizes:
        peaks = [r["peak_rss_mib"] for r in rows if r["batch_size"] == batch_size]
        spread.append(f"batch {batch_size}: {min(peaks):,.0f}-{max(peaks):,.0f} MiB")
    report = {
        "benchmark": NAME,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "verdict": (
            f"Peak RSS across {min(args.cells)}-{max(args.cells)} perturbed cells: "
            + "; ".join(spread)
            + ". Not compared with Geneformer's implementation (not installable offline here)."
        ),
        "environment": short_environment(),
    }
    text = markdown(report)
    write_report(args.out / f"{NAME}.json", report, text)
    print(text)
    return report


if __name__ == "__main__":
    main()
