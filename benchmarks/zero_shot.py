"""Zero-shot embedding quality: cellfoundry encoders vs the standard PCA baseline.

Question: without any fine-tuning, do a pretrained encoder's cell embeddings separate known
labels better than the representation every single-cell analysis starts from? Each labelled
human dataset in ``../shared/data`` is embedded by every ``--model`` (pooling ``cls`` and
``mean``, through ``cellfoundry.embed``) and by the baseline ``log1p(normalize_total(1e4))`` ->
top-2,000 highly variable genes (Seurat dispersion, all genes if fewer) -> PCA(50), on the same
cells in the same run. Every representation is scored with the same code:

- **kNN accuracy** (and macro F1): 5-fold stratified cross-validated ``k=15`` nearest-neighbour
  label prediction, Euclidean distance;
- **NMI / ARI** between the labels and a KMeans clustering with ``n_clusters`` = number of
  labels (``n_init=10``; Leiden needs scanpy/igraph, which the environment does not have);
- **label silhouette** (Euclidean, scIB-rescaled to [0, 1]: ``(ASW + 1) / 2``; deterministic).

The metrics are ``cellfoundry.evaluation``'s (``knn_predictions``, ``nmi_ari``,
``label_silhouette``, ``accuracy``, ``macro_f1``). The best model representation is compared
with PCA per metric with a paired bootstrap over cells (``paired_bootstrap``, 95% interval; see
:func:`comparisons`); it is "ahead" only when the interval excludes 0.

Fold splits and KMeans are repeated over ``--seeds`` (default 0 1 2): figures are mean ± sd over
seeds (sd is that randomness only, not a data-resampling interval). Cells are drawn with a
seeded RNG (``--max-cells``); the embedding order depends only on the data, so reruns on the same
machine and thread count give the same figures. Writes ``<out>/zero_shot.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from cellfoundry._benchmarking import command_line, git_state, package_version, write_report
from cellfoundry._io import sha256_file
from cellfoundry.evaluation.baselines import pca_baseline

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "zero_shot"
DEFAULT_MODELS = ["cellfoundry-tiny-bert", "cellfoundry-tiny-mamba"]
POOLINGS = ("cls", "mean")
PCA_NAME = "PCA baseline"

# name -> file, label column, labels to drop, why it is in the benchmark
DATASETS = {
    "pbmc68k": {
        "file": "annot_pbmc68k_reduced_zheng2017.h5ad",
        "label": "cell_type",
        "drop": [],
        "note": (
            "Zheng 2017 PBMC (scanpy's pbmc68k_reduced), 10 cell types, 765 genes, "
            "log-normalised X (no raw counts): not in the pretraining corpus (held out). The "
            "models get expm1(X), i.e. per-cell depth-normalised values whose within-cell order "
            "is that of the raw counts; PCA gets X as is (already log1p(normalize_total))."
        ),
    },
    "dlpfc": {
        "file": "spatial_dlpfc_visium_maynard2021.h5ad",
        "label": "region",
        "drop": ["unlabelled"],
        "note": (
            "Maynard 2021 DLPFC Visium spots (3 sections), cortical layers L1-L6 + WM, raw "
            "counts, 7,319 genes; 'unlabelled' spots dropped. Part of the pretraining corpus "
            "(the models have seen these spots, not their labels)."
        ),
    },
    "kang": {
        "file": "pert_kang2018_ifnb_pbmc.h5ad",
        "label": "perturbation",
        "drop": [],
        "note": (
            "Kang 2018 PBMC, control vs IFN-beta (no cell types in this release), raw counts, "
            "14,053 genes. The label is confounded with the capture batch (ctrl/stim) and the "
            "file is in the pretraining corpus; read it as 'does the embedding keep the "
            "interferon response', not as annotation. kNN accuracy is the informative metric "
            "here: KMeans with 2 clusters splits along the dominant axis (cell type), so NMI/ARI "
            "are near 0 for any representation that keeps cell types."
        ),
    },
}


# -- data -----------------------------------------------------------------------------------
def load_dataset(name: str, max_cells: int, seed: int):
    """Labelled cells (seeded draw of at most ``max_cells``): AnnData for the models, info."""
    import anndata as ad
    import scipy.sparse as sp

    spec = DATASETS[name]
    path = DATA / spec["file"]
    adata = ad.read_h5ad(path)
    labels = adata.obs[spec["label"]].astype(str)
    keep = np.flatnonzero(~labels.isin(spec["drop"]).to_numpy())
    n_labelled = int(keep.size)
    if n_labelled > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_cells, replace=False))
    adata = adata[keep].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    x_kind = str(adata.uns.get("x_kind", "counts"))
    info = {
        "file": spec["file"],
        "sha256": sha256_file(path),
        "label": spec["label"],
        "dropped_labels": spec["drop"],
        "x_kind": x_kind,
        "n_cells_file": int(labels.size),
        "n_cells_labelled": n_labelled,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "cell_draw": (
            f"np.random.default_rng({seed}).choice(labelled, {max_cells}), sorted"
            if n_labelled > max_cells
            else "all labelled cells"
        ),
        "label_counts": adata.obs[spec["label"]].astype(str).value_counts().to_dict(),
        "note": spec["note"],
    }
    return adata, info


def model_input(adata, x_kind: str):
    """What the encoders tokenize: raw counts, or expm1 of log-normalised values."""
    import anndata as ad

    if x_kind == "counts":
        return adata, {}
    if x_kind != "lognorm":
        raise ValueError(f"x_kind={x_kind!r}: only counts or lognorm inputs are supported")
    x = adata.X.copy()
    x.data = np.expm1(x.data)
    return ad.AnnData(X=x, obs=adata.obs[[]], var=adata.var), {"allow_normalized": True}


# -- metrics --------------------------------------------------------------------------------
def score(x: np.ndarray, labels: np.ndarray, seeds: list[int], k: int, folds: int) -> tuple:
    """kNN accuracy / macro F1 (CV), KMeans NMI / ARI per seed; label silhouette once.

    All metrics are ``cellfoundry.evaluation``'s, so figures match the rest of the project.
    Returns the metrics and the out-of-fold kNN predictions of the first seed (for the paired
    bootstrap against PCA).
    """
    from sklearn.metrics import silhouette_samples

    from cellfoundry.evaluation import (
        accuracy,
        knn_predictions,
        label_silhouette,
        macro_f1,
        nmi_ari,
    )
    from cellfoundry.evaluation.integration import kmeans_clusters

    per_seed: dict[str, list[float]] = {
        "knn_accuracy": [],
        "knn_macro_f1": [],
        "nmi": [],
        "ari": [],
    }
    first = None
    for seed in seeds:
        predicted = knn_predictions(x, labels, n_neighbors=k, n_splits=folds, seed=seed)
        first = predicted if first is None else first
        per_seed["knn_accuracy"].append(accuracy(labels, predicted))
        per_seed["knn_macro_f1"].append(macro_f1(labels, predicted))
        nmi, ari = nmi_ari(x, labels, seed=seed)
        per_seed["nmi"].append(nmi)
        per_seed["ari"].append(ari)
    out = {
        name: {
            "mean": round(float(np.mean(values)), 4),
            "sd": round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 4),
            "per_seed": [round(float(v), 4) for v in values],
        }
        for name, values in per_seed.items()
    }
    out["silhouette"] = {"mean": round(label_silhouette(x, labels), 4), "sd": 0.0, "per_seed": None}
    per_cell = {
        "knn": first,
        # seed-0 clustering and per-cell silhouettes: what the paired bootstraps resample
        "clusters": kmeans_clusters(x, len(np.unique(labels)), seeds[0]),
        "silhouette": silhouette_samples(x, labels),
    }
    return out, per_cell


# -- models ---------------------------------------------------------------------------------
def load_encoder(name: str, device: str):
    from cellfoundry.models import load_model

    return load_model(name).to(device).eval()


def random_init_copy(encoder):
    """Same class and config, fresh seeded initialisation: what pretraining is measured against."""
    import torch

    torch.manual_seed(0)
    return type(encoder)(encoder.config).to(encoder.device).eval()


def embed_all(encoder, adata, options: dict, args: argparse.Namespace) -> dict:
    """One ``cellfoundry.embed`` call per pooling; vectors and seconds."""
    from cellfoundry import embed

    out = {}
    for pooling in args.poolings:
        start = time.perf_counter()
        vectors = embed(
            adata,
            model=encoder,
            pooling=pooling,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
            key_added=None,
            progress=False,
            **options,
        )
        out[pooling] = (vectors, time.perf_counter() - start)
    return out


def model_facts(name: str, encoder) -> dict:
    config = encoder.config
    return {
        "name_or_path": name,
        "model_type": config.model_type,
        "class": type(encoder).__name__,
        "tokenizer_id": config.tokenizer_id,
        "vocab_sha256": config.vocab_sha256,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }


# -- report ---------------------------------------------------------------------------------
METRICS = ("knn_accuracy", "knn_macro_f1", "nmi", "ari", "silhouette")
METRIC_LABELS = {
    "knn_accuracy": "kNN acc",
    "knn_macro_f1": "kNN macro F1",
    "nmi": "NMI",
    "ari": "ARI",
    "silhouette": "silhouette",
}


def _nmi(truth: np.ndarray, clusters: np.ndarray) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(truth, clusters, average_method="arithmetic"))


def _ari(truth: np.ndarray, clusters: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, clusters))


def _rescaled_mean(_truth: np.ndarray, per_cell_silhouette: np.ndarray) -> float:
    return float((np.mean(per_cell_silhouette) + 1) / 2)


# metric -> (per-cell values the bootstrap resamples, metric of a resample)
BOOTSTRAPPED = {
    "knn_accuracy": ("knn", "accuracy"),
    "knn_macro_f1": ("knn", "macro_f1"),
    "nmi": ("clusters", _nmi),
    "ari": ("clusters", _ari),
    "silhouette": ("silhouette", _rescaled_mean),
}


def comparisons(rows: list[dict], labels: np.ndarray, draws: int) -> list[dict]:
    """Per metric: best model representation minus PCA, and who is ahead.

    Every metric gets a paired bootstrap over cells (``paired_bootstrap``): the same resampled
    cells score both representations, from their seed-0 out-of-fold kNN predictions (kNN
    accuracy, macro F1), seed-0 KMeans clusters (NMI, ARI; the clustering is held fixed, so
    the interval covers which cells were scored, not KMeans restarts) or per-cell silhouettes.
    A representation is ahead only when the 95% interval excludes 0.
    """
    from cellfoundry.evaluation import paired_bootstrap

    pca = next((r for r in rows if r["representation"] == PCA_NAME), None)
    ours = [r for r in rows if r["representation"] != PCA_NAME]
    if pca is None or not ours:
        return []
    found = []
    for metric in METRICS:
        best = max(ours, key=lambda r: r["metrics"][metric]["mean"])
        diff = best["metrics"][metric]["mean"] - pca["metrics"][metric]["mean"]
        entry = {
            "metric": metric,
            "best_model_representation": best["representation"],
            "best_model_value": best["metrics"][metric]["mean"],
            "pca_value": pca["metrics"][metric]["mean"],
            "difference": round(diff, 4),
        }
        source, score_fn = BOOTSTRAPPED[metric]
        paired = paired_bootstrap(
            labels,
            best["_per_cell"][source],
            pca["_per_cell"][source],
            score_fn,
            draws=draws,
            seed=0,
        )
        low, high = paired.ci95
        entry["seed0_difference"] = round(paired.value, 4)
        entry["seed0_ci95"] = [round(low, 4), round(high, 4)]
        entry["test"] = f"paired bootstrap over cells ({draws} draws), seed-0 {source}"
        ahead = low > 0 or high < 0
        if not ahead:
            entry["ahead"] = "tie"
        else:
            entry["ahead"] = best["representation"] if diff > 0 else PCA_NAME
        found.append(entry)
    return found


def _pm(entry: dict) -> str:
    if entry["per_seed"] is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"


def markdown(report: dict) -> str:
    settings, env = report["settings"], report["environment"]
    lines = [
        "# Zero-shot embeddings vs PCA",
        "",
        f"kNN: {settings['folds']}-fold stratified CV, k={settings['k']}, Euclidean; "
        "NMI/ARI: KMeans (n_clusters = labels, n_init=10); label silhouette rescaled to [0, 1] "
        "(Euclidean), all from `cellfoundry.evaluation`. Mean ± sd over seeds "
        f"{settings['seeds']} (fold split and KMeans seed). torch {env['versions']['torch']}, "
        f"{env['torch_threads']} thread(s), {env['device']}.",
        "",
    ]
    for name, block in report["datasets"].items():
        info = block["data"]
        lines += [
            f"## {name}: `{info['file']}`, label `{info['label']}`",
            "",
            f"{info['n_cells']:,} cells ({info['cell_draw']}), {info['n_genes']:,} genes, "
            f"{len(info['label_counts'])} labels. {info['note']}",
            "",
            "| representation | dim | "
            + " | ".join(METRIC_LABELS[m] for m in METRICS)
            + " | embed s |",
            "|---|---:|" + "---:|" * len(METRICS) + "---:|",
        ]
        for row in block["results"]:
            seconds = row.get("embed_seconds")
            cells = [_pm(row["metrics"][m]) for m in METRICS]
            lines.append(
                f"| {row['representation']} | {row['dim']} | "
                + " | ".join(cells)
                + f" | {'-' if seconds is None else f'{seconds:.1f}'} |"
            )
        if block["comparison"]:
            lines += ["", "| metric | best model representation | minus PCA | 95% CI | ahead |"]
            lines += ["|---|---|---:|---|---|"]
            for c in block["comparison"]:
                ci = c.get("seed0_ci95")
                ci_text = "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
                lines.append(
                    f"| {METRIC_LABELS[c['metric']]} | {c['best_model_representation']} "
                    f"({c['best_model_value']:.3f}) | {c['difference']:+.3f} "
                    f"(PCA {c['pca_value']:.3f}) | {ci_text} | {c['ahead']} |"
                )
        if block.get("dropped_cells"):
            lines += ["", f"Cells without embedding (no vocabulary gene): {block['dropped_cells']}"]
        lines.append("")
    lines += ["## Models", ""]
    for name, facts in report["models"].items():
        if "error" in facts:
            lines.append(f"- `{name}`: not measured: {facts['error']}")
        else:
            lines.append(
                f"- `{name}`: {facts['model_type']}, {facts['num_hidden_layers']} layers, hidden "
                f"{facts['hidden_size']}, {facts['parameters'] / 1e6:.1f}M parameters, "
                f"tokenizer {facts['tokenizer_id']}, max length "
                f"{report['settings']['max_length'] or facts['max_position_embeddings']}"
            )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def environment(args: argparse.Namespace) -> dict:
    import torch

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            name: package_version(name)
            for name in ("cellfoundry", "torch", "transformers", "scikit-learn", "numpy")
        },
        **git_state(ROOT),
        "command": command_line(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        help=f"shipped name, folder or Hub id; repeatable (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), metavar="NAME"
    )
    parser.add_argument("--poolings", nargs="+", default=list(POOLINGS), choices=POOLINGS)
    parser.add_argument("--max-cells", type=int, default=1000, help="per dataset (seeded draw)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the cell draw")
    parser.add_argument("--k", type=int, default=15, help="kNN neighbours")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--bootstrap-draws", type=int, default=2000, help="paired bootstrap")
    parser.add_argument("--n-hvg", type=int, default=2000)
    parser.add_argument("--n-pcs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None, help="tokens/cell (model's)")
    parser.add_argument(
        "--random-init-control",
        action="store_true",
        help="also score a random-initialised copy of each model (same config, seed 0)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and .md")
    parser.add_argument("--name", default=NAME, help="results file stem")
    args = parser.parse_args(argv)
    args.models = args.models or list(DEFAULT_MODELS)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("cellfoundry").setLevel(logging.ERROR)  # normalised-input warnings
    started = time.perf_counter()
    env = environment(args)
    encoders, models = {}, {}
    for name in args.models:
        try:
            encoders[name] = load_encoder(name, args.device)
            models[name] = model_facts(name, encoders[name])
            if args.random_init_control:
                control = f"{name} [random init]"
                encoders[control] = random_init_copy(encoders[name])
                models[control] = {**models[name], "name_or_path": control}
        except (ValueError, OSError) as error:  # unknown name, missing folder
            models[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"skip model {name}: {models[name]['error']}", flush=True)
    datasets = {}
    for dataset in args.datasets:
        adata, info = load_dataset(dataset, args.max_cells, args.data_seed)
        labels_all = adata.obs[info["label"]].astype(str).to_numpy()
        print(
            f"{dataset}: {info['n_cells']:,} cells, {len(info['label_counts'])} labels", flush=True
        )
        vectors: dict[str, tuple[np.ndarray, float | None, dict]] = {}
        start = time.perf_counter()
        pcs, details = pca_baseline(adata, info["x_kind"], args.n_hvg, args.n_pcs, seed=0)
        vectors[PCA_NAME] = (pcs, time.perf_counter() - start, details)
        inputs, options = model_input(adata, info["x_kind"])
        for name, encoder in encoders.items():
            for pooling, (vec, seconds) in embed_all(encoder, inputs, options, args).items():
                vectors[f"{name} ({pooling})"] = (vec, seconds, {"pooling": pooling})
                print(f"  embedded {name} ({pooling}) in {seconds:.1f} s", flush=True)
        # the same cells for every representation: drop any a model could not embed
        ok = np.ones(adata.n_obs, dtype=bool)
        for vec, _, _ in vectors.values():
            ok &= np.isfinite(vec).all(axis=1)
        labels = labels_all[ok]
        results = []
        for representation, (vec, seconds, details) in vectors.items():
            metrics, predictions = score(
                vec[ok].astype(np.float64), labels, args.seeds, args.k, args.folds
            )
            results.append(
                {
                    "_per_cell": predictions,
                    "representation": representation,
                    "dim": int(vec.shape[1]),
                    "embed_seconds": None if seconds is None else round(seconds, 2),
                    "details": details,
                    "metrics": metrics,
                }
            )
            print(
                f"  {representation:<40} "
                + "  ".join(f"{METRIC_LABELS[m]} {_pm(metrics[m])}" for m in METRICS),
                flush=True,
            )
        datasets[dataset] = {
            "data": info,
            "n_cells_scored": int(ok.sum()),
            "dropped_cells": int((~ok).sum()),
            "results": results,
            "comparison": comparisons(results, labels, args.bootstrap_draws),
        }
        for row in results:
            del row["_per_cell"]
    report = {
        "benchmark": NAME,
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": models,
        "datasets": datasets,
        "notes": [
            "Same cells, same scoring code and seeds for every representation; the PCA "
            "baseline is refitted on exactly the cells scored (unsupervised, no labels).",
            "Model embeddings come from `cellfoundry.embed` (tokenized on the fly with the "
            "model's own tokenizer, last layer, the pooling named); no scaling before scoring.",
            "PCA: scanpy's 'seurat' HVG flavour reimplemented in numpy/pandas (scanpy is not "
            "installed here); PCA on centred, unscaled log values (no sc.pp.scale).",
            "Clustering: KMeans with the true number of labels (Leiden needs scanpy/igraph). "
            "This favours no representation but is not the Leiden-resolution sweep of scIB.",
            "'ahead': the 95% interval of a paired bootstrap over cells excludes 0 (seed-0 kNN "
            "folds for kNN metrics; seed-0 KMeans clusters held fixed for NMI / ARI, so that "
            "interval covers which cells were scored, not KMeans restarts; per-cell silhouettes "
            "for silhouette). 'minus PCA' is the mean over seeds; the interval is seed 0's.",
            "Silhouette is scIB's rescaled label ASW, (mean silhouette + 1) / 2, in [0, 1].",
            "Human datasets with labels only: MERFISH/STARmap (mouse) and Papalexi (299 sampled "
            "genes, knockouts mostly invisible) are left out.",
        ],
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    json_path = args.out / f"{args.name}.json"
    text = markdown(report)
    write_report(json_path, report, text)
    print(text)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    if not encoders:
        print("no model could be loaded: only the PCA baseline was scored", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
