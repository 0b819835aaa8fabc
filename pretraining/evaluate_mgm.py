"""Held-out masked-gene accuracy of a pretrained model beside the rank-position prior.

Usage::

    python pretraining/evaluate_mgm.py --model runs/bert-tiny --data data/tokenized/human \
        [--split runs/bert-tiny/split.json] [--out runs/bert-tiny/heldout_eval.json]

Scores top-1/top-10 accuracy of the model and of the gene-frequency prior at each rank
position (fitted on the training cells) on the same masked tokens of the held-out cells, with
95% bootstrap intervals of the difference over cells; see ``cellfoundry.training.heldout``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cellfoundry._io import atomic_write_text
from cellfoundry.training.heldout import evaluate_pretrained


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print a table and write the JSON report."""
    parser = argparse.ArgumentParser(prog="evaluate_mgm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, shipped name or id")
    parser.add_argument("--data", nargs="+", required=True, help="tokenized folder(s) of the run")
    parser.add_argument("--split", help="the run's split.json (default: MODEL/split.json)")
    parser.add_argument("--out", help="report path (default: MODEL/heldout_eval.json)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    split = options.split or str(Path(options.model) / "split.json")
    report = evaluate_pretrained(
        options.model, options.data, split, options.batch_size, options.seed
    )
    print(f"{report['cells']} held-out cells, {report['masked_genes']} masked genes")
    for name, difference in report["difference"].items():
        low, high = difference["ci95"]
        print(
            f"{name}: model {report['model'][name]:.4f}  prior {report['prior'][name]:.4f}  "
            f"difference {difference['value']:+.4f} (95% CI {low:+.4f} to {high:+.4f})"
        )
    out = Path(options.out or Path(options.model) / "heldout_eval.json")
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
