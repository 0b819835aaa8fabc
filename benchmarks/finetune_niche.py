"""Spatial niche tasks by LoRA fine-tuning, with and without neighbourhood context, beside the
baselines a spatial analyst tries first, on held-out sections.

For each setting and seed, two ``finetuning/finetune.py --task niche`` processes (the cell's
own tokens; plus the frozen base encoder's mean neighbour vector) train on some sections and
are scored on a held-out one. Each process fits the baselines on the same training cells
(:func:`cellfoundry.tasks.niche.niche_baselines`): logistic / ridge regression on PCA of the
cell's own expression and of its neighbourhood-averaged expression, kNN on PCA, and the
majority class / training mean; the model's difference to the best baseline comes with a
paired bootstrap over test cells.

    python benchmarks/finetune_niche.py                                  # every setting, 3 seeds
    python benchmarks/finetune_niche.py --settings starmap-composition --seeds 0

Writes ``benchmarks/results/finetune_niche.{json,md}`` (settings, seeds and contexts not run this
time are kept from the previous file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_annotation import environment, run_finetune_process  # noqa: E402

from cellfoundry._benchmarking import command_line, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "finetune_niche"
CONTEXTS = {"own": False, "neighbours": True}
SETTINGS = {
    "dlpfc-region": {
        "file": "spatial_dlpfc_visium_maynard2021.h5ad",
        "target": "region",
        "label": "region",
        "section": "section",
        "holdout": ["151676"],
        "drop": ["unlabelled"],
        "allow_normalized": False,
        "note": "DLPFC Visium cortical layers (Maynard 2021); train on sections 151673/151675, "
        "test on 151676. Spots were in the pretraining corpus (labels were not).",
    },
    "starmap-composition": {
        "file": "spatial_starmap_mpfc_wang2018.h5ad",
        "target": "composition",
        "label": "cell_type",
        "section": "batch",
        "holdout": ["slice2"],
        "drop": ["NA"],
        "allow_normalized": False,
        "note": "STARmap mouse mPFC (Wang 2018, 158 genes via orthologs): cell-type fractions "
        "among neighbours within the radius; train on slices 0-1, test on slice 2.",
    },
    "starmap-density": {
        "file": "spatial_starmap_mpfc_wang2018.h5ad",
        "target": "density",
        "label": "cell_type",
        "section": "batch",
        "holdout": ["slice2"],
        "drop": ["NA"],
        "allow_normalized": False,
        "note": "STARmap: neighbours within the radius (log1p count, as trained); slices 0-1 "
        "-> slice 2.",
    },
    "merfish-composition": {
        "file": "spatial_merfish_hypothalamus_moffitt2018.h5ad",
        "target": "composition",
        "label": "cell_type",
        "section": "batch",
        "holdout": ["bregma_0.21"],
        "drop": ["Ambiguous", "Ependymal"],
        "allow_normalized": True,
        "note": "MERFISH mouse hypothalamus (Moffitt 2018, 161 genes, volume-normalised values: "
        "the tokenizer ranks them, baselines take log1p); one slice -> the other.",
    },
}
SETTINGS.update(
    {
        "seqfish-region": {
            "file": "spatial_seqfish_visualcortex_zhu2018.h5ad",
            "prepare": "seqfish",
            "target": "region",
            "label": "region",
            "section": "block",
            "holdout": ["bottom"],
            "drop": [],
            "allow_normalized": True,
            "note": "seqFISH mouse visual cortex (Zhu 2018, 125 genes via orthologs), 9 HMRF "
            "domains, one field of view. Released as z-scores: tokenized as exp(z) "
            "(`cellfoundry.tokenization.zscores`: same gene order as z within a cell), baselines "
            "take the z-scores as they are. No second section: the field is cut into three "
            "bands along y, across the layers (every domain is in every band); train on the "
            "top and middle bands, test on the bottom one, graphs within bands.",
        },
        "intestine-zone": {
            "file": "spatialzone_intestine_moor2018.h5ad",
            "target": "region",
            "label": "region",
            "section": None,
            "split": "random",
            "contexts": ["own"],
            "drop": [],
            "allow_normalized": False,
            "note": "Mouse small-intestine enterocytes (Moor 2018), villus zones V0-V6. "
            "Dissociated cells: no coordinates, so no neighbourhood context or neighbourhood "
            "baseline; stratified random split (20% test) per seed. The zones were inferred "
            "by the authors from landmark-gene expression, so expression baselines are "
            "expected to be strong.",
        },
    }
)
PRIMARY = {"region": "macro_f1", "composition": "mse", "density": "mse"}


def prepared_data(spec: dict, work: Path) -> Path:
    """The file a setting trains on: the shared file, or a prepared copy in ``work``."""
    source = DATA / spec["file"]
    if spec.get("prepare") != "seqfish":
        return source
    import anndata as ad

    from cellfoundry._io import atomic_write_h5ad
    from cellfoundry.tokenization.zscores import positive_from_zscores

    target = work / "prepared" / "seqfish_exp_z.h5ad"
    if target.is_file():
        return target
    adata = ad.read_h5ad(source)
    prepared = positive_from_zscores(adata)
    y = np.asarray(adata.obsm["spatial"])[:, 1]
    cuts = np.quantile(y, [1 / 3, 2 / 3])
    prepared.obs["block"] = np.select([y < cuts[0], y < cuts[1]], ["bottom", "middle"], "top")
    return atomic_write_h5ad(prepared, target)


def split_options(spec: dict) -> list[str]:
    """Hold out whole sections, or (no sections) a stratified random fifth per seed."""
    if spec.get("split", "holdout") == "random":
        return ["split_strategy=random"]
    return [
        f"batch_key={spec['section']}",
        "split_strategy=holdout",
        f"holdout={json.dumps(spec['holdout'])}",
    ]


def finetune(spec: dict, context: str, seed: int, out: Path, args) -> dict:
    command = [
        sys.executable,
        str(ROOT / "finetuning" / "finetune.py"),
        "--task",
        "niche",
        "--data",
        str(prepared_data(spec, args.work)),
        "--output_dir",
        str(out),
        "--max_steps",
        str(args.max_steps),
        f"label_key={spec['label']}",
        *split_options(spec),
        f"drop_labels={json.dumps(spec['drop'])}",
        f"split_seed={seed}",
        f"seed={seed}",
        f"batch_size={args.batch_size}",
        f"learning_rate={args.lr}",
        f"head_learning_rate={args.head_lr}",
        f"eval_every={args.max_steps}",
        "log_every=10",
        f"allow_normalized={str(spec['allow_normalized']).lower()}",
        "overwrite_output_dir=true",
        "progress_bar=false",
        f"task.base_model={args.model}",
        "task.tuning=lora",
        f"task.target={spec['target']}",
        f"task.label_key={spec['label']}",
        f"task.section_key={spec['section'] or 'null'}",
        f"task.neighbor_context={str(CONTEXTS[context]).lower()}",
    ]
    return run_finetune_process(command, out, args.threads, f"{context} seed {seed}")


def summarise(runs: list[dict], target: str) -> dict:
    """Mean ± sd over seeds of every method's metrics; per-run comparisons."""
    metrics = ["macro_f1", "accuracy"] if target == "region" else ["mse"]
    if target == "composition":
        metrics.append("mean_pearson")
    table: dict[str, dict] = {}
    for run in runs:
        named = {f"model ({run['context']})": run["metrics"]["model"]}
        if run["context"] == "own":
            named.update(run["metrics"]["baselines"])
        for name, values in named.items():
            for metric in metrics:
                table.setdefault(name, {}).setdefault(metric, []).append(values[metric])
    return {
        name: {
            m: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
            for m, v in values.items()
        }
        for name, values in table.items()
    }


def markdown(report: dict) -> str:
    lines = [
        "# Spatial niche tasks (LoRA, held-out section)",
        "",
        f"Model `{report['settings']['model']}`, LoRA, {report['settings']['max_steps']} steps of "
        f"{report['settings']['batch_size']} cells. Radius: median distance to the 10th "
        "nearest neighbour within a section. `own`: the cell's tokens; `neighbours`: plus the "
        "frozen base encoder's mean neighbour vector. Baselines fitted on the training "
        "sections in each run; mean ± sd over seeds. MSE: lower is better.",
    ]
    for name, block in report["results"].items():
        spec = SETTINGS[name]
        lines += ["", f"## {name}", "", spec["note"], ""]
        metrics = list(next(iter(block["summary"].values())))
        lines += [
            "| method | " + " | ".join(metrics) + " |",
            "|---|" + "---:|" * len(metrics),
        ]
        for method, values in block["summary"].items():
            cells = " | ".join(f"{values[m]['mean']:.3f} ± {values[m]['sd']:.3f}" for m in metrics)
            lines.append(f"| {method} | {cells} |")
        lines += [
            "",
            "| context | seed | metric | model minus best baseline (95% CI) | verdict |",
            "|---|---|---|---|---|",
        ]
        for run in block["runs"]:
            for metric, c in run["metrics"]["comparison"].items():
                lines.append(
                    f"| {run['context']} | {run['seed']} | {metric} | {c['difference']:+.4f} "
                    f"({c['ci95'][0]:+.4f} to {c['ci95'][1]:+.4f}) vs {c['best_baseline']} | "
                    f"{c['verdict']} |"
                )
        lines += ["", f"Verdict: {block['verdict']}"]
    return "\n".join(lines) + "\n"


def verdict(runs: list[dict], target: str) -> str:
    metric = PRIMARY[target]
    parts = []
    for context in CONTEXTS:
        verdicts = [
            r["metrics"]["comparison"][metric]["verdict"] for r in runs if r["context"] == context
        ]
        if verdicts:
            parts.append(f"{context}: {metric} vs best baseline per seed {', '.join(verdicts)}")
    own = {r["seed"]: r["metrics"]["model"][metric] for r in runs if r["context"] == "own"}
    with_context = {r["seed"]: r["metrics"]["model"][metric] for r in runs if r["context"] != "own"}
    shared = sorted(set(own) & set(with_context))
    if shared:
        change = np.mean([with_context[s] - own[s] for s in shared])
        parts.append(f"neighbour context changes the model's {metric} by {change:+.4f} (mean)")
    return "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--contexts", nargs="+", default=list(CONTEXTS), choices=list(CONTEXTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="cellfoundry-tiny-bert")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--head-lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / NAME)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = args.out / f"{NAME}.json"
    report = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    report.update(
        benchmark=NAME,
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        environment=environment(args),
    )
    for name in args.settings:
        spec = SETTINGS[name]
        # runs of other seeds / contexts from an earlier invocation are kept
        earlier = report["results"].get(name, {}).get("runs", [])
        runs = [
            r for r in earlier if r["seed"] not in args.seeds or r["context"] not in args.contexts
        ]
        contexts = [c for c in args.contexts if c in spec.get("contexts", CONTEXTS)]
        for seed in args.seeds:
            for context in contexts:
                out = args.work / name / f"{context}-seed{seed}"
                result = finetune(spec, context, seed, out, args)
                runs.append({"seed": seed, "context": context, **result})
                value = result["metrics"]["model"][PRIMARY[spec["target"]]]
                print(f"{name} seed {seed} {context}: {PRIMARY[spec['target']]} {value:.4f}")
        runs.sort(key=lambda r: (r["seed"], list(CONTEXTS).index(r["context"])))
        report["results"][name] = {
            "command": command_line(),  # settings merge across invocations: each keeps its own
            "model": args.model,
            "runs": runs,
            "summary": summarise(runs, spec["target"]),
            "verdict": verdict(runs, spec["target"]),
        }
        write_report(path, report, markdown(report))  # after each setting: partial progress
    text = markdown(report)
    write_report(path, report, text)
    print(text)
    return report


if __name__ == "__main__":
    main()
