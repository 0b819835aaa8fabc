"""The benchmark suite: which script measures each task, with which arguments per tier.

Tiers: ``full`` is what produced the committed ``benchmarks/results`` (3 seeds, every dataset);
``quick`` runs one script per task on small settings (1 seed, few steps) into its own folder in
under 10 minutes on 2 cores; ``smoke`` runs the same scripts on tiny data so CI can tell that the
harness and every script still run end to end. Every tier writes results files that follow the
results schema and then ``SUMMARY.md`` / ``summary.json`` / charts for its folder.

The scripts live in the repository's ``benchmarks/`` folder (they are not part of the wheel):
``cellfoundry bench`` runs from a clone or an editable install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellfoundry._io import atomic_write_text

TIERS = ("full", "quick", "smoke")
RUN_RECORD = "suite_run.json"  # the last suite run into a folder: steps, exit codes, seconds


@dataclass(frozen=True)
class Step:
    """One script run of a task: its arguments per tier, written as one string each (None:
    not run in that tier)."""

    task: str
    script: str
    full: str | None
    quick: str | None
    smoke: str | None
    takes_model: bool = True
    takes_work: bool = True
    out_file: str | None = None  # None: ``--out DIR``; else ``out_flag DIR/out_file``
    out_flag: str = "--out"

    def arguments(self, tier: str) -> list[str] | None:
        line = getattr(self, tier)
        return None if line is None else line.split()


GRN_COMMON = "--datasets kang --seeds 0 --supervised-datasets"
GRN_FULL = (
    "--supervised-datasets --attention-cells 600 --embedding-cells 1000 --deletion-cells 60 "
    "--genie3-cells 300 --genie3-trees 30 --n-boot 200"
)
GRN_QUICK = (
    f"{GRN_COMMON} --attention-cells 100 --embedding-cells 200 --deletion-cells 8 "
    "--genie3-cells 100 --genie3-trees 10 --n-boot 50"
)
GRN_SMOKE = (
    f"{GRN_COMMON} --attention-cells 20 --embedding-cells 20 --deletion-cells 2 "
    "--genie3-cells 40 --genie3-trees 3 --n-boot 10 --n-genes 150"
)
ONE_SEED = "--seeds 0"

STEPS: tuple[Step, ...] = (
    Step(
        "tokenizer",
        "tokenizer_throughput",
        full="",
        quick="--n-cells 5000 --repeats 1 --no-scale --reference-cells 200",
        smoke="--n-cells 300 --repeats 1 --no-scale --reference-cells 30 --no-warmup",
        takes_model=False,
        takes_work=False,
        out_file="tokenizer_throughput.json",
    ),
    Step(
        "encoder",
        "encoder_throughput",
        full="--time-budget-s 1500",
        quick="--sizes 10M --lengths 256 1024 --modes forward --repeats 1",
        smoke="--sizes tiny --lengths 64 --modes forward --repeats 1",
        takes_model=False,
        takes_work=False,
        out_file="encoder_throughput_cpu.json",
        out_flag="--output",
    ),
    Step(
        "embedding",
        "embedding_throughput",
        full="",
        quick="--cells 100",
        smoke="--cells 16",
        takes_model=False,
        takes_work=False,
    ),
    Step(
        "zero-shot",
        "zero_shot",
        full="--random-init-control --threads 1",
        quick=f"--datasets pbmc68k {ONE_SEED} --max-cells 700 --bootstrap-draws 200",
        smoke=f"--datasets pbmc68k {ONE_SEED} --max-cells 120 --folds 2 --bootstrap-draws 20",
        takes_work=False,
    ),
    Step(
        "annotation",
        "finetune_annotation",
        full="--datasets starmap dlpfc merfish --few-shot",
        quick=f"--datasets starmap {ONE_SEED} --modes lora --max-steps 40",
        smoke=f"--datasets starmap {ONE_SEED} --modes lora --max-steps 2",
    ),
    Step(
        "annotation",
        "finetune_memory",
        full="",
        quick=None,
        smoke="--sizes shipped --steps 2 --repeats 1 --checkpointing off",
        takes_model=False,
        takes_work=False,
    ),
    Step(
        "integration",
        "finetune_integration",
        full="--datasets starmap dlpfc merfish --modes lora lora_no_adversary",
        quick=f"--datasets starmap {ONE_SEED} --modes lora --max-steps 40 --no-scvi",
        smoke=f"--datasets starmap {ONE_SEED} --modes lora --max-steps 2 --no-scvi",
    ),
    Step(
        "perturbation",
        "finetune_perturbation",
        full="",
        quick=f"{ONE_SEED} --heldout 1 --max-steps 40",
        smoke=f"{ONE_SEED} --heldout 1 --max-steps 2",
    ),
    Step("perturbation", "finetune_perturbation_unseen", full="", quick=None, smoke=None),
    Step("perturbation", "in_silico_memory", full="--cells 30 90 270", quick=None, smoke=None),
    Step("grn", "grn", full=GRN_FULL, quick=GRN_QUICK, smoke=GRN_SMOKE),
    Step(
        "grn",
        "grn",
        full="--datasets kang liao dlpfc --supervised-only --supervised-datasets kang liao dlpfc",
        quick=None,
        smoke=None,
    ),
    Step(
        "niche",
        "finetune_niche",
        full="",
        quick=f"--settings starmap-density {ONE_SEED} --max-steps 40",
        smoke=f"--settings starmap-density {ONE_SEED} --max-steps 2",
    ),
)
TASKS = tuple(dict.fromkeys(step.task for step in STEPS))


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (clone or editable install), or a clear error."""
    candidates = [Path(__file__).resolve().parents[3] / "benchmarks", Path.cwd() / "benchmarks"]
    for folder in candidates:
        if (folder / "finetune_niche.py").is_file():
            return folder
    raise FileNotFoundError(
        "The benchmark scripts are not installed with the wheel: run `cellfoundry bench` from a "
        "clone of the repository (pip install -e .), where benchmarks/ sits beside src/."
    )


def command(step: Step, tier: str, out: Path, work: Path, model: str | None) -> list[str]:
    """The command line of one step in a tier."""
    arguments = step.arguments(tier) or []
    line = [sys.executable, str(benchmarks_dir() / f"{step.script}.py"), *arguments]
    line += [step.out_flag, str(out / step.out_file if step.out_file else out)]
    if step.takes_work and tier != "full":
        line += ["--work", str(work / step.script)]
    if model and step.takes_model:
        line += ["--model", model]
    return line


def selected_steps(tier: str, tasks: list[str] | None) -> list[Step]:
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; choose from {list(TASKS)}.")
    return [s for s in STEPS if s.arguments(tier) is not None and (not tasks or s.task in tasks)]


def run_suite(
    tier: str = "quick",
    tasks: list[str] | None = None,
    model: str | None = None,
    out: Path | None = None,
    work: Path | None = None,
    jobs: int = 1,
    summary: bool = True,
    charts: bool = True,
) -> dict[str, Any]:
    """Run the tier's steps (``jobs`` at a time, one thread each when parallel), then write
    the summary of ``out``. Returns per-step wall times and the summary."""
    if tier not in TIERS:
        raise ValueError(f"tier={tier!r}; use one of {TIERS}.")
    root = benchmarks_dir()
    out = Path(out) if out else root / "results" / ("" if tier == "full" else tier)
    work = Path(work) if work else root.parent / "runs" / f"bench-{tier}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    steps = selected_steps(tier, tasks)
    env = dict(os.environ)
    if jobs > 1:  # share the cores instead of oversubscribing them
        threads = str(max(1, (os.cpu_count() or 2) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def launch(index_step: tuple[int, Step]) -> dict[str, Any]:
        index, step = index_step
        line = command(step, tier, out, work, model)
        log = out / "logs" / f"{index:02d}-{step.script}.log"
        start = time.perf_counter()
        with open(log, "w") as handle:
            done = subprocess.run(line, stdout=handle, stderr=subprocess.STDOUT, env=env)
        seconds = round(time.perf_counter() - start, 1)
        print(f"[{step.task}] {step.script}: exit {done.returncode} in {seconds} s ({log})")
        return {"task": step.task, "script": step.script, "command": " ".join(line[1:]),
                "exit": done.returncode, "seconds": seconds, "log": str(log)}  # fmt: skip

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        ran = list(pool.map(launch, enumerate(steps)))
    seconds = round(time.perf_counter() - start, 1)
    outcome: dict[str, Any] = {"tier": tier, "out": str(out), "steps": ran, "seconds": seconds}
    failed = [r for r in ran if r["exit"] != 0]
    record = {**outcome, "jobs": jobs, "cpu_count": os.cpu_count(), "model": model}
    atomic_write_text(out / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    if summary:
        from cellfoundry.bench.summary import write_summary
        from cellfoundry.bench.umaps import embedding_umaps

        if charts and (not tasks or "embedding" in tasks or "zero-shot" in tasks):
            embedding_umaps(out / "charts", model=model, tier=tier)
        outcome["summary"] = write_summary(out, charts=charts, publish=tier == "full")
    if failed:
        names = ", ".join(f"{r['script']} (log {r['log']})" for r in failed)
        raise RuntimeError(f"{len(failed)} benchmark step(s) failed: {names}")
    return outcome


def add_arguments(parser: Any) -> None:
    """Options shared by ``cellfoundry bench`` and ``benchmarks/run.py``."""
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: all")
    parser.add_argument("--model", default=None, help="base model for the model benchmarks")
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument(
        "--quick",
        action="store_const",
        dest="tier",
        const="quick",
        help="one small run per task, < 10 min on 2 cores (results/quick/)",
    )
    tier.add_argument(
        "--smoke",
        action="store_const",
        dest="tier",
        const="smoke",
        help="tiny data: does every script still run (results/smoke/)",
    )
    tier.add_argument(
        "--summary-only",
        action="store_const",
        dest="tier",
        const="summary",
        help="only regenerate SUMMARY.md, summary.json and charts of --out",
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder of this run")
    parser.add_argument("--work", type=Path, default=None, help="run folders of this run")
    parser.add_argument("--jobs", type=int, default=None, help="steps at once (quick: 2)")
    parser.add_argument("--no-charts", action="store_true", help="SUMMARY.md without PNGs")
    parser.set_defaults(tier="full")


def run_from_arguments(args: Any) -> int:
    """Run what the parsed options ask for; prints where the summary is."""
    from cellfoundry.bench.summary import SUMMARY_MD, write_summary

    if args.tier == "summary":
        out = Path(args.out or benchmarks_dir() / "results")
        # only the repository's own results feed the shipped model cards
        publish = out.resolve() == (benchmarks_dir() / "results").resolve()
        if not args.no_charts and not list((out / "charts").glob("umap_*.png")):
            from cellfoundry.bench.umaps import embedding_umaps

            embedding_umaps(out / "charts", model=args.model, tier="full")
        write_summary(out, charts=not args.no_charts, publish=publish)
        print(f"summary: {Path(out) / SUMMARY_MD}")
        return 0
    jobs = args.jobs or (2 if args.tier == "quick" else 1)
    outcome = run_suite(
        args.tier, args.tasks, args.model, args.out, args.work, jobs, charts=not args.no_charts
    )
    print(
        f"{len(outcome['steps'])} steps in {outcome['seconds']} s; "
        f"summary: {outcome['out']}/{SUMMARY_MD}"
    )
    return 0
