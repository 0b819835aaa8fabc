"""Cell-type annotation by fine-tuning: LoRA vs full fine-tuning vs a linear probe vs baselines.

Question: does fine-tuning a pretrained cellfoundry encoder annotate held-out cells better than
the simple methods an analyst would use instead? For every dataset and seed, one split file
(a held-out batch/slice/section, or a seeded random split) is made once and shared by
everything scored on it:

- three fine-tuning modes of the same base model, each a separate ``finetuning/finetune.py``
  process (so peak memory is that run's alone): ``lora``, ``full`` and ``linear_probe``;
  ``full`` trains only the head for the first third of the steps, then everything at 1e-5
  ("linear probe, then fine-tune"): of eight full fine-tuning settings tried on STARmap's
  validation cells, the only one that did not end below the probe (finetuning/README.md);
- the baselines, fitted on the same training cells by the runner in each process
  (``cellfoundry.evaluation.baselines``): L2 logistic regression on log-normalised HVGs and
  kNN (k=15) on PCA(50) of them.

Reported per dataset: macro-F1 (primary), accuracy, mean ± sd over seeds; the difference of
each mode to the better baseline with its paired bootstrap 95% interval over test cells (per
seed; "beats" only when every seed's interval excludes 0 on the same side); trainable
parameter share, peak resident memory (sampled every 50 ms) and wall time of each run.

    python benchmarks/finetune_annotation.py                       # all datasets, 3 seeds
    python benchmarks/finetune_annotation.py --datasets starmap --seeds 0 --few-shot 10

Settings per dataset: ``holdout`` (train on the other batches, test on the held-out one; the
note's batch) and ``few-shot N`` (N training cells per type, test a seeded stratified 20% of
all labelled cells, validation at most N unused cells per type; few-shot sets are nested: the
10-shot training cells are among the 50-shot ones for a seed).

Writes ``benchmarks/results/finetune_annotation.{json,md}`` (results of datasets not run this
time are kept from the previous file, each with its own environment record).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from cellfoundry._benchmarking import command_line, package_version, write_report
from cellfoundry.bench.extract.finetuning import run_that_made
from cellfoundry.bench.lora_variants import LORA_VARIANTS, overrides, task_fields

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "finetune_annotation"
# the LoRA variants (cellfoundry.bench.lora_variants: every linear layer, the project's
# default; attention only; attention only with A frozen, LoRA-FA) share rank 8; LoRA-FA has its
# own learning rate (--lr-lora-fa, picked on validation cells: finetuning/README.md)
MODES = (*LORA_VARIANTS, "full", "linear_probe")
BASELINES = ("logistic regression (HVG)", "kNN on PCA")

# name -> file, label and batch columns, split, labels left out, why it is here
DATASETS = {
    "starmap": {
        "file": "spatial_starmap_mpfc_wang2018.h5ad",
        "label": "cell_type",
        "batch": "batch",
        "holdout": ["slice2"],
        "drop": ["NA"],
        "allow_normalized": False,
        "note": "STARmap mouse mPFC (Wang 2018), 158 genes (mouse -> human orthologs), raw "
        "counts, 15 types; train on slices 0-1, test on slice 2. Not in the pretraining corpus.",
    },
    "merfish": {
        "file": "spatial_merfish_hypothalamus_moffitt2018.h5ad",
        "label": "cell_type",
        "batch": "batch",
        "holdout": ["bregma_0.21"],
        "drop": ["Ambiguous", "Ependymal"],
        "allow_normalized": True,
        "note": "MERFISH mouse hypothalamus (Moffitt 2018), 161 genes, volume-normalised values "
        "(not counts: the tokenizer ranks them, baselines take log1p); train on one slice, "
        "test on the other. 'Ambiguous' and 'Ependymal' (2 cells) left out.",
    },
    "dlpfc": {
        "file": "spatial_dlpfc_visium_maynard2021.h5ad",
        "label": "region",
        "batch": "section",
        "holdout": ["151676"],
        "drop": ["unlabelled"],
        "allow_normalized": False,
        "note": "DLPFC Visium (Maynard 2021), cortical layers of spots, raw counts; train on "
        "sections 151673/151675, test on 151676. In the pretraining corpus (spots seen, labels "
        "never).",
    },
}


class PeakRss:
    """Peak resident memory of a child process (and its children), sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
                rss += sum(c.memory_info().rss for c in self.process.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def split_overrides(spec: dict, setting: dict) -> list[str]:
    """Split settings for one benchmark setting: a held-out batch, or ``n`` cells per type."""
    common = [f"drop_labels={json.dumps(spec['drop'])}"]
    if setting["strategy"] == "holdout":
        return [*common, "split_strategy=holdout", f"holdout={json.dumps(spec['holdout'])}"]
    return [*common, "split_strategy=few_shot", f"n_per_class={setting['n_per_class']}"]


def finetune(spec: dict, setting: dict, mode: str, seed: int, out: Path, split: Path, args) -> dict:
    """One ``finetuning/finetune.py`` process; its test metrics, peak RSS and wall time."""
    steps = setting["max_steps"]
    command = [
        sys.executable,
        str(ROOT / "finetuning" / "finetune.py"),
        "--task",
        "annotation",
        "--data",
        str(DATA / spec["file"]),
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        f"label_key={spec['label']}",
        f"batch_key={spec['batch']}",
        *split_overrides(spec, setting),
        f"split_file={split}",
        f"split_seed={seed}",
        f"seed={seed}",
        f"batch_size={args.batch_size}",
        f"learning_rate={args.learning_rate[mode]}",
        f"head_learning_rate={args.head_lr}",
        f"eval_every={steps}",
        f"log_every={min(10, steps)}",
        f"allow_normalized={str(spec['allow_normalized']).lower()}",
        "overwrite_output_dir=true",
        "progress_bar=false",
        f"task.base_model={args.model}",
        *overrides(mode),
        "task.balance_classes=true",
    ]
    if mode == "full":  # linear probe, then fine-tune: see finetuning/README.md
        command.append(f"head_only_steps={round(steps * args.full_head_only_share)}")
    return run_finetune_process(command, out, args.threads, f"{mode} seed {seed}")


def run_finetune_process(command: list[str], out: Path, threads: int, description: str) -> dict:
    """Run one fine-tuning process; its test metrics, peak RSS (MiB) and wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    meter = PeakRss(child.pid)
    _, stderr = child.communicate()
    peak = meter.stop()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"{description} failed:\n{stderr.decode()[-3000:]}")
    metrics = json.loads((out / "test_metrics.json").read_text())
    return {"metrics": metrics, "peak_rss_mib": round(peak, 1), "wall_s": round(seconds, 1)}


def trainable_share(model: str, task: str = "annotation") -> dict[str, float]:
    """Share of parameters that train in each mode (head for 15 classes and 3 batches)."""
    from cellfoundry.tasks import TaskConfig, build_task_model

    shares = {}
    names = {"labels": [str(i) for i in range(15)]}
    if task == "integration":
        names["batches"] = ["a", "b", "c"]
    for mode in MODES:
        config = TaskConfig.from_dict(
            {"task": task, "base_model": model, **task_fields(mode), **names}
        )
        task_model = build_task_model(config)
        total = sum(p.numel() for p in task_model.parameters())
        trained = sum(p.numel() for p in task_model.parameters() if p.requires_grad)
        shares[mode] = {"trainable": trained, "total": total, "share": trained / total}
    return shares


def summarise(runs: list[dict]) -> dict:
    """Mean ± sd over seeds per method; per-mode comparison to the better baseline."""

    def stats(values: list[float]) -> dict:
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return {"mean": float(np.mean(values)), "sd": sd, "per_seed": values}

    methods = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        methods[mode] = {
            metric: stats([r["metrics"]["model"][metric] for r in rows])
            for metric in ("macro_f1", "accuracy")
        }
        methods[mode]["peak_rss_mib"] = stats([r["peak_rss_mib"] for r in rows])
        methods[mode]["wall_s"] = stats([r["wall_s"] for r in rows])
    first_mode = [r for r in runs if r["mode"] == runs[0]["mode"]]
    for name in BASELINES:
        methods[name] = {
            metric: stats([r["metrics"]["baselines"][name][metric] for r in first_mode])
            for metric in ("macro_f1", "accuracy")
        }
    comparisons = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        for metric in ("macro_f1", "accuracy") if rows else ():
            per_seed = [r["metrics"]["comparison"][metric] for r in rows]
            lows = [c["ci95"][0] for c in per_seed]
            highs = [c["ci95"][1] for c in per_seed]
            verdict = "not shown (some seed's interval includes 0)"
            if all(low > 0 for low in lows):
                verdict = "fine-tuned model better in every seed"
            elif all(high < 0 for high in highs):
                verdict = "baseline better in every seed"
            comparisons[f"{mode}/{metric}"] = {
                "best_baseline_per_seed": [c["best_baseline"] for c in per_seed],
                "difference_per_seed": [c["difference"] for c in per_seed],
                "ci95_per_seed": [c["ci95"] for c in per_seed],
                "verdict": verdict,
            }
    return {"methods": methods, "comparisons": comparisons}


def environment(args: argparse.Namespace) -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads_per_run": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": {
            n: package_version(n)
            for n in ("torch", "transformers", "peft", "scikit-learn", "cellfoundry")
        },
        "load_average_1min": os.getloadavg()[0],
        "command": command_line(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cell(entry: dict | None, spec: str = ".3f") -> str:
    if entry is None:
        return "-"
    return f"{entry['mean']:{spec}} ± {entry['sd']:{spec}}"


def kept_note(block: dict) -> str:
    """Names the modes whose runs were kept from an earlier run of the same split."""
    return "".join(
        f" Modes {', '.join(r['modes'])} are from an earlier run on the same splits "
        f"({r['environment']['timestamp_utc']}: `{r['environment']['command']}`)."
        for r in block.get("kept_from_previous_runs", [])
    )


def learning_rates(block: dict) -> str:
    """Each mode's learning rate (adapters or encoder weights), from the run that made it."""
    rates = {
        mode: run_that_made(block, mode)["settings"].get("learning_rate", {}).get(mode)
        for mode in block["summary"]["methods"]
        if mode != "linear_probe"  # nothing but the head trains
    }
    return "; ".join(f"{mode} {rate:g}" for mode, rate in rates.items() if rate is not None)


def markdown(report: dict) -> str:
    lines = [
        "# Annotation by fine-tuning vs baselines",
        "",
        "Macro-F1 (primary) and accuracy on held-out test cells, mean ± sd over seeds (seed "
        "changes initialisation, batch order and the validation draw; in holdout settings the "
        "test set is a fixed held-out batch, in few-shot settings the seed also draws the "
        "training and test cells). Baselines are fitted on the same training cells in the same "
        "runs. Peak RSS is the whole fine-tuning process (Python, torch, data and model included).",
        "",
    ]
    for name, block in report["datasets"].items():
        settings = block["settings"]
        setting = block.get("setting", {"max_steps": settings["max_steps"]})
        lines += [
            f"## {name}: `{block['file']}`, label `{block['label']}`",
            "",
            f"{block['note']} Split (seed {settings['seeds'][0]}): {block['split']}. "
            f"{setting['max_steps']} steps of {settings['batch_size']} cells; seeds "
            f"{settings['seeds']}; base model `{settings['model']}`; "
            f"{block['environment']['timestamp_utc']}. Learning rates (adapters or encoder; the "
            f"head {settings['head_lr']:g}): {learning_rates(block)}.{kept_note(block)}",
            "",
            "| method | macro-F1 | accuracy | trainable | peak RSS MiB | wall s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        summary, shares = block["summary"], block["trainable"]
        for method, entry in summary["methods"].items():
            share = shares.get(method)
            trainable = f"{100 * share['share']:.2f}%" if share else "-"
            lines.append(
                f"| {method} | {_cell(entry['macro_f1'])} | {_cell(entry['accuracy'])} | "
                f"{trainable} | {_cell(entry.get('peak_rss_mib'), '.0f')} | "
                f"{_cell(entry.get('wall_s'), '.0f')} |"
            )
        lines += [
            "",
            "| mode / metric | minus best baseline, per seed (95% CI) | verdict |",
            "|---|---|---|",
        ]
        for key, comparison in summary["comparisons"].items():
            cells = "; ".join(
                f"{d:+.3f} ({low:+.3f} to {high:+.3f}) vs {b}"
                for d, (low, high), b in zip(
                    comparison["difference_per_seed"],
                    comparison["ci95_per_seed"],
                    comparison["best_baseline_per_seed"],
                    strict=True,
                )
            )
            lines.append(f"| {key} | {cells} | {comparison['verdict']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def kept_runs(previous: dict | None, runs: list[dict], setting: dict, settings: dict) -> list[dict]:
    """Runs of the modes not run now, kept from the previous result of the same setting.

    Running one new mode (``--modes lora_attention``) then adds it beside the earlier ones
    instead of replacing them. Runs are kept only when the setting, seeds, base model and batch
    size are the same, and every seed's baselines score the same in both runs: the baselines
    are fitted on the split, so equal scores show that the split files, made anew from the
    seed, are the same cells (checked, not assumed).
    """
    if previous is None:
        return []
    same = ("seeds", "model", "batch_size", "few_shot_steps", "max_steps")
    earlier = previous["settings"]
    if previous.get("setting") != setting or any(earlier.get(k) != settings[k] for k in same):
        print(f"previous results of {setting['name']} differ in settings: not kept", flush=True)
        return []
    rerun = {r["mode"] for r in runs}
    kept = [r for r in previous["runs"] if r["mode"] not in rerun]

    def scores(run: dict) -> np.ndarray:
        return np.array(
            [[v["macro_f1"], v["accuracy"]] for _, v in sorted(run["metrics"]["baselines"].items())]
        )

    baselines = {r["seed"]: scores(r) for r in kept}
    for run in runs:
        earlier_scores = baselines.get(run["seed"])
        if earlier_scores is not None and not np.allclose(scores(run), earlier_scores, atol=1e-9):
            raise RuntimeError(
                f"seed {run['seed']} of {setting['name']}: the baselines score differently than "
                "in the previous results, so the split changed; rerun every mode (--modes "
                f"{' '.join(MODES)})."
            )
    return kept


def provenance(previous: dict, kept_modes: set[str]) -> list[dict]:
    """Which earlier run made each kept mode: the previous result's own modes, and the modes
    it had kept in turn, each with its run's settings and environment."""
    earlier = previous.get("kept_from_previous_runs", [])
    inherited = {mode for record in earlier for mode in record["modes"]}
    own = sorted(kept_modes - inherited, key=MODES.index)
    records = []
    if own:
        records.append(
            {"modes": own, "settings": previous["settings"], "environment": previous["environment"]}
        )
    for record in earlier:
        modes = [mode for mode in record["modes"] if mode in kept_modes]
        if modes:
            records.append({**record, "modes": modes})
    return records


def benchmark_settings(args: argparse.Namespace) -> list[dict]:
    """The held-out-batch setting, then one few-shot setting per ``--few-shot`` size."""
    settings = []
    if not args.no_holdout:
        settings.append({"name": "holdout", "strategy": "holdout", "max_steps": args.max_steps})
    for n in args.few_shot:
        steps = args.few_shot_steps
        settings.append(
            {"name": f"few-shot {n}", "strategy": "few_shot", "n_per_class": n, "max_steps": steps}
        )
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="cellfoundry-tiny-bert")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--max-steps", type=int, default=150, help="held-out-batch runs")
    parser.add_argument(
        "--few-shot", type=int, nargs="*", default=[10, 50], help="cells per type (random test)"
    )
    parser.add_argument("--few-shot-steps", type=int, default=60)
    parser.add_argument("--no-holdout", action="store_true", help="few-shot settings only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-lora", type=float, default=2e-4, help="adapters")
    parser.add_argument(
        "--lr-lora-fa",
        type=float,
        default=5e-6,
        help="LoRA-FA adapters (only B trains): of 2e-3 to 2e-6, the best on the validation "
        "cells of held-out STARmap and MERFISH, seed 0 (finetuning/README.md)",
    )
    parser.add_argument("--lr-full", type=float, default=1e-5, help="encoder weights")
    parser.add_argument(
        "--full-head-only-share",
        type=float,
        default=1 / 3,
        help="full mode: share of the steps in which only the head trains (LP-FT)",
    )
    parser.add_argument("--lr-probe", type=float, default=5e-3, help="unused: nothing but the head")
    parser.add_argument("--head-lr", type=float, default=5e-3, help="task head, every mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / NAME, help="run folders")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.learning_rate = {
        **dict.fromkeys(LORA_VARIANTS, args.lr_lora),
        "lora_fa_attention": args.lr_lora_fa,
        "full": args.lr_full,
        "linear_probe": args.lr_probe,
    }
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output = args.out / f"{NAME}.json"
    report = json.loads(output.read_text()) if output.is_file() else {"datasets": {}}
    report["benchmark"] = NAME
    shares = trainable_share(args.model)
    for name in args.datasets:
        spec = DATASETS[name]
        for setting in benchmark_settings(args):
            key = f"{name} / {setting['name']}"
            runs = []
            for seed in args.seeds:
                folder = args.work / name / setting["name"]
                split = folder / f"split-seed{seed}.json"
                split.unlink(missing_ok=True)  # made by this seed's first run, then shared
                for mode in args.modes:
                    out = folder / f"seed{seed}-{mode}"
                    result = finetune(spec, setting, mode, seed, out, split, args)
                    runs.append({"seed": seed, "mode": mode, **result})
                    model = result["metrics"]["model"]
                    print(
                        f"{key} seed {seed} {mode:>12}: macro-F1 {model['macro_f1']:.3f} "
                        f"accuracy {model['accuracy']:.3f}  {result['peak_rss_mib']:.0f} MiB  "
                        f"{result['wall_s']:.0f} s",
                        flush=True,
                    )
            settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
            previous = report["datasets"].get(key)
            kept = kept_runs(previous, runs, setting, settings)
            runs = sorted(runs + kept, key=lambda r: (r["seed"], MODES.index(r["mode"])))
            modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
            report["datasets"][key] = {
                "file": spec["file"],
                "label": spec["label"],
                "note": spec["note"],
                "setting": setting,
                "split": runs[0]["metrics"]["split"],
                "settings": settings,
                "environment": environment(args),
                "trainable": {m: shares[m] for m in modes},
                "runs": runs,
                "summary": summarise(runs),
            }
            if kept:
                report["datasets"][key]["kept_from_previous_runs"] = provenance(
                    previous, {r["mode"] for r in kept}
                )
            write_report(output, report, markdown(report))
    print(markdown(report))
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
