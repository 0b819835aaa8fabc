"""Gene regulatory networks from the pretrained encoder vs correlation, GENIE3 and random, scored
with BEELINE's metrics against DoRothEA A-C and TRRUST, on the human count datasets.

Per dataset: one gene universe (the 1,000 most variable genes detected in >= 5% of cells, plus
the Lambert TFs among the 3,000 most variable), every method ranks TF -> target edges over it,
and each ranking is scored on the regulators the gold standard has there. Randomness enters
through the cells a method sees (seeded subsamples) and the random ranking: 3 seeds each;
Pearson and Spearman use every cell once. Each model method is compared with the best
baseline per metric by a paired bootstrap over regulators. The supervised pair classifier
(``finetuning/finetune.py --task grn``) is trained per seed on 70% of the DoRothEA regulators
and scored on the other 30%, beside the baselines on the same held-out TFs and test cells.

    python benchmarks/grn.py --supervised-datasets            # kang liao dlpfc, 3 seeds
    python benchmarks/grn.py --datasets kang --supervised-only --supervised-datasets kang

Writes ``benchmarks/results/grn.{json,md}`` (``grn_supervised`` with ``--supervised-only``)
after each dataset; edge tables go to ``runs/grn/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "grn"
DATASETS = {
    "kang": "pert_kang2018_ifnb_pbmc.h5ad",
    "liao": "corpus_liao2020_balf_covid.h5ad",
    "dlpfc": "spatial_dlpfc_visium_maynard2021.h5ad",
}
SPLIT_KEYS = {"kang": "batch", "liao": "batch", "dlpfc": "section"}
GOLDS = {
    "DoRothEA A-C": ("grn/dorothea_human_AtoD.csv", "ABC"),
    "TRRUST": ("grn/trrust_human_via_dorothea.csv", None),
}
TF_LIST = "grn/tfs_human_lambert2018.txt"
MODEL_METHODS = ("attention", "embedding", "deletion")
BASELINES = ("Pearson", "Spearman", "GENIE3", "random")


def run_methods(adata, universe, regulators, args, work: Path) -> tuple[dict, dict]:
    """Edge tables of every method and seed, and each method's seconds per run."""
    from cellfoundry.grn import GeneUniverse, infer_edges, write_edges

    # Rows of TFs no gold standard scores are never read: the model methods skip them
    # (GENIE3 keeps every TF as a candidate regressor; only its rows are trimmed).
    scored = GeneUniverse(universe.columns, universe.genes, tuple(regulators))
    model = {"model": args.model, "batch_size": args.batch_size}
    plans = {
        "Pearson": ([0], lambda s: infer_edges(adata, scored, "pearson")),
        "Spearman": ([0], lambda s: infer_edges(adata, scored, "spearman")),
        "random": (args.seeds, lambda s: infer_edges(adata, scored, "random", seed=s)),
        "GENIE3": (
            args.seeds,
            lambda s: infer_edges(
                adata,
                universe,
                "genie3",
                seed=s,
                n_trees=args.genie3_trees,
                max_cells=args.genie3_cells,
            ),
        ),
        "attention": (
            args.seeds,
            lambda s: infer_edges(
                adata, scored, "attention", seed=s, max_cells=args.attention_cells, **model
            ),
        ),
        "embedding": (
            args.seeds,
            lambda s: infer_edges(
                adata, scored, "embedding", seed=s, max_cells=args.embedding_cells, **model
            ),
        ),
        "deletion": (
            args.seeds,
            lambda s: infer_edges(
                adata, scored, "deletion", seed=s, max_cells=args.deletion_cells, **model
            ),
        ),
    }
    tables, seconds = {}, {}
    for method, (seeds, make) in plans.items():
        tables[method], times = [], []
        for seed in seeds:
            start = time.perf_counter()
            table = make(seed)
            times.append(time.perf_counter() - start)
            table = table[table["tf"].isin(regulators)].reset_index(drop=True)
            write_edges(table, work / f"{method}-seed{seed}.tsv")
            tables[method].append(table)
        seconds[method] = round(float(np.mean(times)), 1)
        print(f"  {method}: {seconds[method]:.0f} s per run", flush=True)
    return tables, seconds


def score_dataset(name: str, args) -> dict:
    import anndata as ad

    from cellfoundry.evaluation.grn import (
        GRN_METRICS,
        gold_standard,
        grn_scores,
        read_edges,
        read_tf_list,
        tf_bootstrap_differences,
    )
    from cellfoundry.grn import gene_universe

    adata = ad.read_h5ad(SHARED / DATASETS[name])
    tfs = read_tf_list(SHARED / TF_LIST)
    universe = gene_universe(adata, tfs, n_genes=args.n_genes)
    golds = {
        gold: gold_standard(read_edges(SHARED / path, level), universe.genes, tfs, gold)
        for gold, (path, level) in GOLDS.items()
    }
    regulators = sorted(set().union(*(g.tfs for g in golds.values())))
    print(
        f"{name}: {adata.n_obs} cells, {len(universe.genes)} genes, {len(universe.tfs)} TFs, "
        f"{len(regulators)} with gold edges",
        flush=True,
    )
    tables, seconds = run_methods(adata, universe, regulators, args, args.work / name)
    entry: dict = {
        "cells": int(adata.n_obs),
        "genes": len(universe.genes),
        "tfs_in_universe": len(universe.tfs),
        "seconds_per_run": seconds,
        "golds": {},
    }
    for gold_name, gold in golds.items():
        per_method = {}
        for method, items in tables.items():
            runs = [grn_scores(t, gold).to_dict() for t in items]
            per_method[method] = {
                "runs": runs,
                **{
                    f"{k}_mean": float(np.mean([r[k] for r in runs]))
                    for k in (*GRN_METRICS, "n_scored")
                },
                **{f"{k}_sd": float(np.std([r[k] for r in runs])) for k in GRN_METRICS},
            }
        comparisons = {}
        for method in MODEL_METHODS:
            comparisons[method] = {}
            for metric in GRN_METRICS:
                best = max(BASELINES, key=lambda b: per_method[b][f"{metric}_mean"])
                difference = tf_bootstrap_differences(
                    tables[method], tables[best], gold, args.n_boot, seed=0
                )[metric]
                comparisons[method][metric] = {"best_baseline": best, **difference}
        first = next(iter(per_method.values()))["runs"][0]
        entry["golds"][gold_name] = {
            "tfs": len(gold.tfs),
            "true_edges": first["n_true"],
            "candidate_edges": first["n_possible"],
            "density": first["density"],
            "methods": per_method,
            "comparisons": comparisons,
        }
    return entry


def supervised(name: str, seed: int, args) -> dict:
    """One pair-classifier run through finetune.py; its test metrics."""
    from cellfoundry._benchmarking import run_finetuning_process

    overrides = [
        f"label_key={SPLIT_KEYS[name]}",
        "split_strategy=random",
        f"seed={seed}",
        f"split_seed={seed}",
        f"batch_size={args.batch_size}",
        f"learning_rate={args.lr}",
        f"head_learning_rate={args.head_lr}",
        f"task.base_model={args.model}",
        f"task.gold={SHARED / GOLDS['DoRothEA A-C'][0]}",
        "task.confidence=ABC",
        f"task.tf_list={SHARED / TF_LIST}",
        f"task.n_genes={args.n_genes}",
        f"task.tf_split_seed={seed}",
        f"task.max_cells_scored={args.attention_cells}",
    ]
    out = args.work / name / f"classifier-seed{seed}"
    run = run_finetuning_process(
        "grn", SHARED / DATASETS[name], out, args.max_steps, overrides, f"{name} seed {seed}"
    )
    return {"seed": seed, **run}


def _cell(values: dict, metric: str) -> str:
    return f"{values[f'{metric}_mean']:.3f} ± {values[f'{metric}_sd']:.3f}"


def markdown(report: dict) -> str:
    from cellfoundry.evaluation.grn import GRN_METRICS

    s = report["settings"]
    lines = [
        "# Gene regulatory networks (BEELINE metrics)",
        "",
        f"Model `{s['model']}`. Universe per dataset: the {s['n_genes']} most variable genes "
        "detected in >= 5% of cells plus the Lambert TFs among the 3,000 most variable; every "
        "method scores the same candidate edges (each regulator with >= 1 gold edge there, to "
        "every other universe gene). EPR = precision of the top-k edges (k = true edges, ties "
        "kept) over the density; AUPRC ratio = average precision over the density; random ~ 1 "
        "and AUROC 0.5. Mean ± sd over seeds "
        f"{s['seeds']} (cell subsamples: attention {s['attention_cells']}, embedding "
        f"{s['embedding_cells']}, deletion {s['deletion_cells']}, GENIE3 {s['genie3_cells']} "
        f"cells with {s['genie3_trees']} trees; Pearson and Spearman: all cells, one run). "
        "Unscored edges (gene pairs never together in a cell's context window) rank last.",
    ]
    for name, entry in report["datasets"].items():
        lines += ["", f"## {name} ({entry['cells']} cells, {entry['genes']} genes)"]
        for gold_name, gold in entry["golds"].items():
            lines += [
                "",
                f"### {gold_name}: {gold['tfs']} regulators, {gold['true_edges']} true of "
                f"{gold['candidate_edges']} candidate edges (density {gold['density']:.4f})",
                "",
                "| method | EPR | AUPRC ratio | AUROC | edges scored | s per run |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for method, values in gold["methods"].items():
                scored = f"{values['n_scored_mean'] / gold['candidate_edges']:.0%}"
                lines.append(
                    f"| {method} | {_cell(values, 'epr')} | {_cell(values, 'auprc_ratio')} | "
                    f"{_cell(values, 'auroc')} | {scored} | "
                    f"{entry['seconds_per_run'][method]:.0f} |"
                )
            lines += [
                "",
                "| model method | metric | minus best baseline (95% CI, TF bootstrap) | verdict |",
                "|---|---|---|---|",
            ]
            for method, metrics in gold["comparisons"].items():
                for metric in GRN_METRICS:
                    c = metrics[metric]
                    lines.append(
                        f"| {method} | {metric} | {c['difference']:+.3f} ({c['ci_low']:+.3f} to "
                        f"{c['ci_high']:+.3f}) vs {c['best_baseline']} | {c['verdict']} |"
                    )
    if report.get("supervised"):
        lines += [
            "",
            "## Supervised pair classifier (LoRA), held-out TFs (DoRothEA A-C)",
            "",
            f"Trained {s['max_steps']} steps of {s['batch_size']} cells on pairs of 70% of the "
            "regulators; scored on the other 30% on the test cells, beside the baselines on the "
            "same TFs and cells.",
            "",
            "| dataset | seed | held-out TFs | metric | model | best baseline | difference (95% CI)"
            " | verdict |",
            "|---|---|---:|---|---:|---|---|---|",
        ]
        for name, runs in report["supervised"].items():
            for run in runs:
                m = run["metrics"]
                for metric in GRN_METRICS:
                    c = m["comparison"][metric]
                    base = m["baselines"][c["best_baseline"]][metric]
                    lines.append(
                        f"| {name} | {run['seed']} | {len(m['heldout_tfs'])} | {metric} | "
                        f"{m['model'][metric]:.3f} | {c['best_baseline']} {base:.3f} | "
                        f"{c['difference']:+.3f} ({c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}) | "
                        f"{c['verdict']} |"
                    )
    lines += ["", "## Verdict", "", *report["verdict"]]
    return "\n".join(lines) + "\n"


def verdict_lines(report: dict) -> list[str]:
    """Plain sentences: where a model method beat the best baseline, and where it did not."""
    wins, total = [], 0
    for name, entry in report["datasets"].items():
        for gold_name, gold in entry["golds"].items():
            for method, metrics in gold["comparisons"].items():
                for metric, c in metrics.items():
                    total += 1
                    if c["verdict"] == "better":
                        wins.append(f"{method} {metric} on {name} / {gold_name}")
    lines = []
    if total:
        lines.append(
            f"- Unsupervised model methods beat the best baseline (CI above 0) in {len(wins)} "
            f"of {total} comparisons" + (f": {', '.join(wins)}." if wins else ".")
        )
    for name, runs in report.get("supervised", {}).items():
        for metric in ("epr", "auroc"):
            verdicts = [
                f"{r['metrics']['comparison'][metric]['verdict']} (vs "
                f"{r['metrics']['comparison'][metric]['best_baseline']})"
                for r in runs
            ]
            lines.append(
                f"- Pair classifier on {name}, held-out TFs, {metric} vs the best baseline per "
                f"seed: {', '.join(verdicts)}."
            )
    return lines


def main(argv: list[str] | None = None) -> dict:
    from cellfoundry._benchmarking import short_environment, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="cellfoundry-tiny-bert")
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--attention-cells", type=int, default=1000)
    parser.add_argument("--embedding-cells", type=int, default=2000)
    parser.add_argument("--deletion-cells", type=int, default=100)
    parser.add_argument("--genie3-cells", type=int, default=500)
    parser.add_argument("--genie3-trees", type=int, default=50)
    parser.add_argument("--n-boot", type=int, default=300)
    parser.add_argument(
        "--supervised-datasets",
        nargs="*",
        default=list(DATASETS),
        help="datasets that also get the pair-classifier runs (none: skip them)",
    )
    parser.add_argument(
        "--supervised-only",
        action="store_true",
        help="only the pair-classifier runs of --supervised-datasets (grn_supervised.json)",
    )
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="reuse a classifier run folder that finished with the same steps and cells",
    )
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / NAME)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    name_out = f"{NAME}_supervised" if args.supervised_only else NAME
    report: dict = {
        "benchmark": name_out,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "datasets": {},
        "supervised": {},
        "environment": short_environment(),
    }

    def write() -> str:
        report["verdict"] = verdict_lines(report)
        text = markdown(report)
        write_report(args.out / f"{name_out}.json", report, text)
        return text

    for name in args.datasets:
        if not args.supervised_only:
            report["datasets"][name] = score_dataset(name, args)
            write()  # after each dataset: partial progress survives an interruption
        if name in args.supervised_datasets:
            report["supervised"][name] = []
            for seed in args.seeds:
                run = reused_run(name, seed, args) if args.reuse_runs else None
                run = run or supervised(name, seed, args)
                report["supervised"][name].append(run)
                epr = run["metrics"]["model"]["epr"]
                print(f"  classifier seed {seed}: EPR {epr:.3f} ({run['wall_s']:.0f} s)")
                write()
    text = write()
    print(text)
    return report


def reused_run(name: str, seed: int, args) -> dict | None:
    """A finished classifier run of the same steps and scored cells, if its folder has one."""
    import yaml

    out = args.work / name / f"classifier-seed{seed}"
    try:
        metrics = json.loads((out / "test_metrics.json").read_text())
        steps = yaml.safe_load((out / "run_args.yaml").read_text())["max_steps"]
        cells = json.loads((out / "task_config.json").read_text())["max_cells_scored"]
    except (OSError, KeyError, ValueError):
        return None
    if steps != args.max_steps or cells != args.attention_cells:
        return None
    print(f"  reusing {out}")
    return {"seed": seed, "metrics": metrics, "wall_s": float("nan"), "reused": True}


if __name__ == "__main__":
    main()
