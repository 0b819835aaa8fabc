"""Batch integration by fine-tuning: LoRA vs full vs a frozen-encoder head vs PCA, Harmony,
LDA on PCA and scVI, scored with scIB-style metrics on held-out cells.

Question: does a pretrained cellfoundry encoder, fine-tuned with the batch-adversarial,
label-keeping head (:mod:`cellfoundry.tasks.integration`), embed cells of several batches
better than the methods an analyst would use instead? For every dataset and seed one split
file (a label-stratified random 70/10/20 split of all batches' cells) is shared by everything
scored on it:

- the fine-tuning modes of the same base model, each a separate ``finetuning/finetune.py``
  process (peak memory is that run's alone);
- PCA, Harmony and LDA on PCA, fitted by the runner in each process
  (:func:`cellfoundry.tasks.integration.integration_baselines`);
- scVI (scvi-tools, when installed: ``pip install -e ".[bench]"``), trained here once per
  split on the training cells' counts with their batches, its latent mean taken for the test
  cells. Not on MERFISH (its values are not counts, which scVI's likelihood needs).

Scores are the seven scIB-style metrics of the test cells' embedding
(:func:`cellfoundry.evaluation.integration_scores`), aggregated as bio, batch and
``total = 0.6 bio + 0.4 batch``. Each mode's difference to the baseline best on total comes
with a paired half-sample 95% interval over test cells, per seed.

    python benchmarks/finetune_integration.py                     # all datasets, 3 seeds
    python benchmarks/finetune_integration.py --datasets starmap --seeds 0 --modes lora

Writes ``benchmarks/results/finetune_integration.{json,md}`` (datasets not run this time are
kept from the previous file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_annotation import (  # noqa: E402
    DATASETS,
    environment,
    run_finetune_process,
    trainable_share,
)

from cellfoundry._benchmarking import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "finetune_integration"
MODES = ("lora", "full", "linear_probe", "lora_no_adversary")
AGGREGATES = ("total", "bio", "batch")
METRICS = ("nmi", "ari", "label_asw", "clisi", "batch_asw", "ilisi", "graph_connectivity")
SCVI = "scVI"
TEST_EMBEDDING = "test_embedding.npz"
NOTES = {
    "starmap": "STARmap mouse mPFC (Wang 2018), 3 slices, 158 genes (mouse -> human "
    "orthologs), raw counts, 15 types (NA left out).",
    "merfish": "MERFISH mouse hypothalamus (Moffitt 2018), 2 slices, 161 genes, "
    "volume-normalised values (not counts; baselines take log1p, scVI is not run).",
    "dlpfc": "DLPFC Visium (Maynard 2021), 3 sections of one donor, raw counts, layers "
    "L1-L6 and WM as labels (unlabelled spots left out). Spots were in the pretraining corpus "
    "(labels never).",
}


def mode_overrides(mode: str, args: argparse.Namespace) -> list[str]:
    """Tuning mode, learning rate and head settings of one mode."""
    tuning = "lora" if mode == "lora_no_adversary" else mode
    overrides = [f"task.tuning={tuning}", f"learning_rate={args.learning_rate[tuning]}"]
    if mode == "lora_no_adversary":
        overrides.append("task.adversary_weight=0")
    if tuning == "full":
        overrides += [f"head_only_steps={args.full_head_only_steps}"]
    return overrides


def finetune(spec: dict, mode: str, seed: int, out: Path, split: Path, args) -> dict:
    """One ``finetuning/finetune.py --task integration`` process; metrics, RSS, wall time."""
    command = [
        sys.executable,
        str(ROOT / "finetuning" / "finetune.py"),
        "--task",
        "integration",
        "--data",
        str(DATA / spec["file"]),
        "--output_dir",
        str(out),
        "--max_steps",
        str(args.max_steps),
        f"label_key={spec['label']}",
        f"batch_key={spec['batch']}",
        f"drop_labels={json.dumps(spec['drop'])}",
        "split_strategy=random",
        f"split_file={split}",
        f"split_seed={seed}",
        f"seed={seed}",
        f"batch_size={args.batch_size}",
        f"head_learning_rate={args.head_lr}",
        f"eval_every={args.max_steps}",
        "log_every=10",
        f"allow_normalized={str(spec['allow_normalized']).lower()}",
        "overwrite_output_dir=true",
        "progress_bar=false",
        f"task.base_model={args.model}",
        *mode_overrides(mode, args),
    ]
    return run_finetune_process(command, out, args.threads, f"{mode} seed {seed}")


def scvi_test_embedding(spec: dict, split_file: Path, seed: int, threads: int) -> dict | None:
    """scVI latent means of the test cells (trained on the training cells), or why not."""
    try:
        import scvi
    except ImportError:
        return {"skipped": "scvi-tools is not installed (pip install -e '.[bench]')"}
    if spec["allow_normalized"]:
        return {"skipped": "values are not counts; scVI models counts"}
    import anndata as ad
    import torch

    from cellfoundry.evaluation.baselines import log_normalize, seurat_hvg
    from cellfoundry.tasks.splits import LabelSplit

    torch.set_num_threads(threads)
    scvi.settings.seed = seed
    adata = ad.read_h5ad(DATA / spec["file"])
    split = LabelSplit.load(split_file, n_obs=adata.n_obs)
    train, test = adata[split.train].copy(), adata[split.test].copy()
    genes = seurat_hvg(log_normalize(train.X, "counts"), 2000)  # training cells pick genes
    train, test = train[:, genes].copy(), test[:, genes].copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(train, batch_key=spec["batch"])
    model = scvi.model.SCVI(train, n_latent=30)
    epochs = min(round(20000 / train.n_obs * 400), 400)  # scvi-tools' default, written out
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    latent = model.get_latent_representation(test)
    return {
        "embedding": latent.astype(np.float32),
        "obs_names": np.asarray(test.obs_names, dtype=str),
        "details": f"scvi-tools {scvi.__version__}: 2,000 HVGs (training cells), n_latent 30, "
        f"{epochs} epochs on {train.n_obs} training cells, CPU",
        "train_s": round(time.perf_counter() - start, 1),
    }


def score_scvi(scvi_result: dict, spec: dict, runs: list[dict], seed: int) -> dict:
    """scVI's scores on the test cells and each run's paired difference to it."""
    import anndata as ad

    from cellfoundry.evaluation import paired_half_sample_differences

    obs = ad.read_h5ad(DATA / spec["file"], backed="r").obs
    names = scvi_result["obs_names"]
    labels = obs.loc[names, spec["label"]].astype(str).to_numpy()
    batches = obs.loc[names, spec["batch"]].astype(str).to_numpy()
    position = {name: i for i, name in enumerate(names)}
    versus = {}
    for run in runs:
        saved = np.load(run["folder"] / "test_embedding.npz", allow_pickle=False)
        rows = np.array([position[name] for name in saved["obs_names"]])
        paired = paired_half_sample_differences(
            saved["embedding"], scvi_result["embedding"][rows], labels[rows], batches[rows]
        )
        versus[run["mode"]] = {m: [paired[m].value, list(paired[m].ci95)] for m in AGGREGATES}
        scores = paired["b"].as_dict()
    return {"scores": scores, "versus": versus, "details": scvi_result["details"]}


def rescore(report: dict) -> None:
    """Recompute every run's paired intervals from its saved test embedding (``--rescore``).

    The baselines are refitted exactly as the run's ``score_test`` fitted them (same split,
    same seed); scVI's intervals cannot be redone (its embedding is not kept) and are dropped,
    its scores stay. Used once, when the half-sample interval was corrected to use the spread
    of the half-samples only.
    """
    import anndata as ad

    from cellfoundry.evaluation import paired_half_sample_differences
    from cellfoundry.tasks.integration import comparison_entries, integration_baselines
    from cellfoundry.tasks.splits import LabelSplit

    for name, block in report["datasets"].items():
        spec = DATASETS[name]
        adata = ad.read_h5ad(DATA / spec["file"])
        for run in block["runs"]:
            folder, seed = Path(run["folder"]), run["seed"]
            split = LabelSplit.load(folder.parent / f"split-seed{seed}.json", n_obs=adata.n_obs)
            saved = np.load(folder / TEST_EMBEDDING, allow_pickle=False)
            test = adata[np.sort(split.test)]
            test = test[test.obs_names.isin(saved["obs_names"])].copy()
            assert list(test.obs_names) == list(saved["obs_names"]), "test order changed"
            train = adata[np.sort(split.train)].copy()
            baselines = integration_baselines(train, test, spec["label"], spec["batch"], seed)
            metrics = run["metrics"]
            best = max(baselines, key=lambda b: metrics["baselines"][b]["total"])
            labels = test.obs[spec["label"]].astype(str).to_numpy()
            batches = test.obs[spec["batch"]].astype(str).to_numpy()
            paired = paired_half_sample_differences(
                saved["embedding"], baselines[best], labels, batches, seed=0
            )
            metrics["comparison"] = comparison_entries(paired, best)
        for row in block["scvi_rows"]:
            row.pop("versus", None)
        block["summary"] = summarise(block["runs"], block["scvi_rows"])
        block["rescored"] = "paired intervals recomputed from the saved test embeddings " + (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )


def summarise(runs: list[dict], scvi_rows: list[dict]) -> dict:
    """Mean ± sd over seeds per method; per-mode verdicts against the best baseline."""

    def stats(values: list[float]) -> dict:
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return {"mean": float(np.mean(values)), "sd": sd, "per_seed": values}

    methods: dict[str, dict] = {}
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    for mode in modes:
        rows = [r for r in runs if r["mode"] == mode]
        methods[mode] = {
            k: stats([r["metrics"]["model"][k] for r in rows]) for k in (*AGGREGATES, *METRICS)
        }
        methods[mode]["peak_rss_mib"] = stats([r["peak_rss_mib"] for r in rows])
        methods[mode]["wall_s"] = stats([r["wall_s"] for r in rows])
    first = [r for r in runs if r["mode"] == modes[0]]
    for name in first[0]["metrics"]["baselines"]:
        methods[name] = {
            k: stats([r["metrics"]["baselines"][name][k] for r in first])
            for k in (*AGGREGATES, *METRICS)
        }
    if scvi_rows:
        methods[SCVI] = {
            k: stats([row["scores"][k] for row in scvi_rows]) for k in (*AGGREGATES, *METRICS)
        }
    comparisons = {}
    for mode in modes:
        rows = [r for r in runs if r["mode"] == mode]
        for metric in AGGREGATES:
            per_seed = []
            for index, row in enumerate(rows):
                entry = row["metrics"]["comparison"][metric]
                best, value, ci = entry["best_baseline"], entry["difference"], entry["ci95"]
                best_value = row["metrics"]["baselines"][best]["total"]
                versus = scvi_rows[index].get("versus") if scvi_rows else None
                if versus and scvi_rows[index]["scores"]["total"] > best_value:
                    best = SCVI
                    value, ci = versus[mode][metric]
                per_seed.append({"best_baseline": best, "difference": value, "ci95": ci})
            verdict = "not shown (some seed's interval includes 0)"
            if all(c["ci95"][0] > 0 for c in per_seed):
                verdict = "fine-tuned model better in every seed"
            elif all(c["ci95"][1] < 0 for c in per_seed):
                verdict = "baseline better in every seed"
            comparisons[f"{mode}/{metric}"] = {"per_seed": per_seed, "verdict": verdict}
    return {"methods": methods, "comparisons": comparisons}


def _cell(entry: dict | None, spec: str = ".3f") -> str:
    return "-" if entry is None else f"{entry['mean']:{spec}} ± {entry['sd']:{spec}}"


def markdown(report: dict) -> str:
    lines = [
        "# Batch integration by fine-tuning vs baselines",
        "",
        "scIB-style scores of held-out test cells (20% of every batch's labelled cells, "
        "label-stratified), mean ± sd over seeds (the seed changes the split, initialisation "
        "and batch order). Bio = mean(NMI, ARI, label ASW, cLISI); batch = mean(batch ASW, "
        "iLISI, graph connectivity); total = 0.6 bio + 0.4 batch; all in [0, 1], higher is "
        "better. The fine-tuned heads and LDA on PCA use the training cells' labels; PCA, "
        "Harmony and scVI use none. Harmony corrects the test cells knowing their batches; "
        "the fine-tuned model embeds each cell alone. Differences: paired half-sample 95% "
        "intervals over test cells against the baseline with the best total in that seed.",
        "",
    ]
    for name, block in report["datasets"].items():
        settings = block["settings"]
        lines += [
            f"## {name}: `{block['file']}`, labels `{block['label']}`, batches `{block['batch']}`",
            "",
            f"{block['note']} Split (seed {settings['seeds'][0]}): {block['split']}. "
            f"{settings['max_steps']} steps of {settings['batch_size']} cells; seeds "
            f"{settings['seeds']}; base model `{settings['model']}`; "
            f"{block['environment']['timestamp_utc']}. scVI: {block['scvi']}.",
            "",
            "| method | total | bio | batch | NMI | ARI | label ASW | cLISI | batch ASW | iLISI "
            "| graph conn. | trainable | peak RSS MiB | wall s |",
            "|---|" + "---:|" * 13,
        ]
        for method, entry in block["summary"]["methods"].items():
            share = block["trainable"].get(method.replace("_no_adversary", ""))
            trainable = f"{100 * share['share']:.2f}%" if share else "-"
            values = " | ".join(_cell(entry[k]) for k in (*AGGREGATES, *METRICS))
            lines.append(
                f"| {method} | {values} | {trainable} | "
                f"{_cell(entry.get('peak_rss_mib'), '.0f')} | {_cell(entry.get('wall_s'), '.0f')} |"
            )
        lines += [
            "",
            "| mode / metric | minus best baseline, per seed (95% CI) | verdict |",
            "|---|---|---|",
        ]
        for key, comparison in block["summary"]["comparisons"].items():
            cells = "; ".join(
                f"{c['difference']:+.3f} ({c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}) vs "
                f"{c['best_baseline']}"
                for c in comparison["per_seed"]
            )
            lines.append(f"| {key} | {cells} | {comparison['verdict']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(NOTES), choices=list(NOTES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="cellfoundry-tiny-bert")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--lr-full", type=float, default=1e-5)
    parser.add_argument("--full-head-only-steps", type=int, default=50, help="LP-FT, as annotation")
    parser.add_argument("--head-lr", type=float, default=5e-3)
    parser.add_argument("--no-scvi", action="store_true", help="skip the scVI baseline")
    parser.add_argument(
        "--rescore", action="store_true", help="recompute the saved runs' intervals only"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / NAME)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.learning_rate = {"lora": args.lr_lora, "full": args.lr_full, "linear_probe": args.head_lr}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output = args.out / f"{NAME}.json"
    report = json.loads(output.read_text()) if output.is_file() else {"datasets": {}}
    report["benchmark"] = NAME
    if args.rescore:
        rescore(report)
        write_report(output, report, markdown(report))
        print(markdown(report))
        return report
    shares = trainable_share(args.model, task="integration")
    for name in args.datasets:
        spec = DATASETS[name]
        runs, scvi_rows, scvi_note = [], [], "not run (--no-scvi)"
        for seed in args.seeds:
            folder = args.work / name
            split = folder / f"split-seed{seed}.json"
            split.unlink(missing_ok=True)  # made by this seed's first run, then shared
            seed_runs = []
            for mode in args.modes:
                out = folder / f"seed{seed}-{mode}"
                result = finetune(spec, mode, seed, out, split, args)
                seed_runs.append({"seed": seed, "mode": mode, "folder": out, **result})
                model = result["metrics"]["model"]
                print(
                    f"{name} seed {seed} {mode:>18}: total {model['total']:.3f} bio "
                    f"{model['bio']:.3f} batch {model['batch']:.3f}  "
                    f"{result['peak_rss_mib']:.0f} MiB  {result['wall_s']:.0f} s",
                    flush=True,
                )
            if not args.no_scvi:
                fitted = scvi_test_embedding(spec, split, seed, args.threads)
                if "skipped" in fitted:
                    scvi_note = f"not run: {fitted['skipped']}"
                else:
                    scvi_rows.append(score_scvi(fitted, spec, seed_runs, seed))
                    scvi_note = f"{fitted['details']} ({fitted['train_s']} s)"
                    print(f"{name} seed {seed} scVI: total {scvi_rows[-1]['scores']['total']:.3f}")
            runs += seed_runs
        for run in runs:
            run["folder"] = str(run["folder"])
        settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
        report["datasets"][name] = {
            "file": spec["file"],
            "label": spec["label"],
            "batch": spec["batch"],
            "note": NOTES[name],
            "split": runs[0]["metrics"]["split"],
            "settings": settings,
            "environment": environment(args),
            "trainable": {m: shares[m] for m in ("lora", "full", "linear_probe")},
            "scvi": scvi_note,
            "scvi_rows": scvi_rows,
            "runs": runs,
            "summary": summarise(runs, scvi_rows),
        }
        write_report(output, report, markdown(report))
    print(markdown(report))
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
