"""Perturbation response (scGen setting) on Kang IFN-beta PBMCs: the fine-tuned response head vs
no change, train mean, additive, linear on PCA and PCA latent arithmetic, in the same runs.

Kang's file has no cell types, so clusters shared by control and stimulated cells are derived
per seed (:func:`cellfoundry.data.perturbation.condition_clusters`: Harmony over condition,
KMeans on control cells, kNN transfer to stimulated cells) and written, with the data, to the
run folder. For each seed and each of the ``--heldout`` largest clusters, one
``finetuning/finetune.py --task perturbation`` process holds out that cluster's stimulated cells
and predicts its mean response from its control cells; the baselines are fitted on the other
clusters by the runner, and every metric's difference to the best baseline comes with a paired
bootstrap over the held-out cluster's cells.

    python benchmarks/finetune_perturbation.py                  # 3 seeds x 3 held-out clusters
    python benchmarks/finetune_perturbation.py --seeds 0 --heldout 1 --max-steps 50

Writes ``benchmarks/results/finetune_perturbation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pert_kang2018_ifnb_pbmc.h5ad"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "finetune_perturbation"


def clustered_file(source: Path, seed: int, n_clusters: int, work: Path) -> tuple[Path, list[str]]:
    """Kang with ``obs["cluster"]`` for this seed; clusters largest first."""
    import anndata as ad

    from cellfoundry.data.perturbation import condition_clusters

    path = work / f"kang-clusters-seed{seed}.h5ad"
    adata = ad.read_h5ad(source)
    adata.obs["cluster"] = condition_clusters(
        adata, "perturbation", "control", n_clusters=n_clusters, seed=seed
    )
    work.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    order = adata.obs["cluster"].value_counts().index.astype(str).tolist()
    return path, order


def finetune(data: Path, cluster: str, seed: int, out: Path, args) -> dict:
    from cellfoundry._benchmarking import run_finetuning_process

    overrides = [
        "label_key=perturbation",
        "batch_key=cluster",
        "split_strategy=holdout",
        f"holdout={json.dumps([cluster])}",
        'drop_labels=["IFN-beta"]',
        f"seed={seed}",
        f"split_seed={seed}",
        f"batch_size={args.batch_size}",
        f"learning_rate={args.lr}",
        f"head_learning_rate={args.head_lr}",
        f"task.base_model={args.model}",
        f"task.tuning={args.mode}",
        f"task.n_genes={args.n_genes}",
    ]
    return run_finetuning_process(
        "perturbation", data, out, args.max_steps, overrides, f"cluster {cluster} seed {seed}"
    )


def markdown(report: dict) -> str:
    from cellfoundry.evaluation.perturbation import LOWER_IS_BETTER, METRICS

    settings = report["settings"]
    named = ", ".join(m + (" (lower is better)" if m in LOWER_IS_BETTER else "") for m in METRICS)
    lines = [
        "# Perturbation response on a held-out cluster (Kang IFN-beta PBMCs)",
        "",
        f"`{Path(settings['data']).name}`: predict the mean log1p-normalised IFN-beta "
        "profile of a cluster whose stimulated cells were never seen, from its control cells. "
        f"Clusters: Harmony over condition, KMeans ({settings['n_clusters']}) on control "
        "cells, kNN transfer (per seed). "
        f"Model: `{settings['model']}`, {settings['mode']}, {settings['max_steps']} steps of "
        f"{settings['batch_size']} cells, {settings['n_genes']} response genes (HVGs of the "
        "training clusters). Baselines fitted on the other clusters in the same run. "
        f"{named}.",
        "",
        "| seed | held-out cluster | cells ctrl/stim | method | " + " | ".join(METRICS) + " |",
        "|---|---|---|---|" + "---:|" * len(METRICS),
    ]
    for run in report["runs"]:
        entry = run["metrics"]["perturbations"]["IFN-beta"]
        cells = f"{entry['n_control']}/{entry['n_perturbed']}"
        for method, values in {"model": entry["model"], **entry["baselines"]}.items():
            row = " | ".join(f"{values[m]:.3f}" for m in METRICS)
            lines.append(f"| {run['seed']} | {run['cluster']} | {cells} | {method} | {row} |")
    lines += [
        "",
        "| metric | model minus best baseline per run (95% CI) | verdict |",
        "|---|---|---|",
    ]
    for metric in METRICS:
        cells, verdicts = [], []
        for run in report["runs"]:
            c = run["metrics"]["perturbations"]["IFN-beta"]["comparison"][metric]
            cells.append(
                f"{c['difference']:+.3f} ({c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}) vs "
                f"{c['best_baseline']}"
            )
            verdicts.append(c["verdict"])
        verdict = (
            "model better in every run"
            if all(v == "better" for v in verdicts)
            else "baseline better in every run"
            if all(v == "worse" for v in verdicts)
            else "not shown (mixed or overlapping)"
        )
        lines.append(f"| {metric} | {'; '.join(cells)} | {verdict} |")
    lines += ["", "## Verdict", ""]
    for metric in METRICS:
        verdicts = [
            r["metrics"]["perturbations"]["IFN-beta"]["comparison"][metric]["verdict"]
            for r in report["runs"]
        ]
        lines.append(
            f"- {metric}: better than the best baseline in {verdicts.count('better')} of "
            f"{len(verdicts)} runs, worse in {verdicts.count('worse')}, no difference in "
            f"{verdicts.count('no difference')}."
        )
    deltas = [
        r["metrics"]["perturbations"]["IFN-beta"]["comparison"]["pearson_delta"]["difference"]
        for r in report["runs"]
    ]
    lines.append(
        "- We do not beat the best baseline overall (usually the linear model on PCA of "
        "Ahlmann-Eltze et al.): the fine-tuned head's pearson_delta differs from it by "
        f"{min(deltas):+.3f} to {max(deltas):+.3f} per run, winning some clusters and losing "
        "others."
        if not all(
            r["metrics"]["perturbations"]["IFN-beta"]["comparison"]["pearson_delta"]["verdict"]
            == "better"
            for r in report["runs"]
        )
        else "- The model beats the best baseline on pearson_delta in every run."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from cellfoundry._benchmarking import short_environment, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="Kang-like .h5ad")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout", type=int, default=3, help="largest clusters held out")
    parser.add_argument("--n-clusters", type=int, default=8)
    parser.add_argument("--model", default="cellfoundry-tiny-bert")
    parser.add_argument("--mode", default="lora", choices=["lora", "full", "linear_probe"])
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / NAME)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = []
    for seed in args.seeds:
        data, clusters = clustered_file(args.data, seed, args.n_clusters, args.work)
        for cluster in clusters[: args.heldout]:
            out = args.work / f"seed{seed}-{cluster}"
            result = finetune(data, cluster, seed, out, args)
            runs.append({"seed": seed, "cluster": cluster, **result})
            model = result["metrics"]["perturbations"]["IFN-beta"]["model"]
            print(
                f"seed {seed} cluster {cluster}: pearson_delta {model['pearson_delta']:.3f} "
                f"l2_top1000 {model['l2_top1000']:.3f}  {result['wall_s']:.0f} s",
                flush=True,
            )
    report = {
        "benchmark": NAME,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "environment": short_environment(),
        "mean_model_minus_best": {
            metric: float(
                np.mean(
                    [
                        r["metrics"]["perturbations"]["IFN-beta"]["comparison"][metric][
                            "difference"
                        ]
                        for r in runs
                    ]
                )
            )
            for metric in runs[0]["metrics"]["perturbations"]["IFN-beta"]["comparison"]
        },
    }
    text = markdown(report)
    write_report(args.out / f"{NAME}.json", report, text)
    print(text)
    return report


if __name__ == "__main__":
    main()
