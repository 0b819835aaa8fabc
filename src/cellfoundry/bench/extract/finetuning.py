"""Summary rows of the fine-tuning family: annotation, integration, zero-shot and LoRA memory.

Each of these benchmarks pairs ours with its baselines seed by seed (same split, same cells),
so every extractor reduces its file to one intermediate, :class:`Paired` (per-seed values of
one method of ours and of the baseline the benchmark chose, plus what it recorded per seed),
and :meth:`Context.row` turns that into a :class:`~cellfoundry.bench.rows.SummaryRow` through
:func:`~cellfoundry.bench.rows.compare_over_seeds`. Nothing is computed that the benchmark did
not measure, except means, sds and across-seed intervals of its per-seed values (and, for the
LoRA targets, the LoRA / full ratio of those means).

``SummaryRow`` has no field for the method, so the method of ours (LoRA, full fine-tuning,
linear probe; the pooling for zero-shot) ends the ``setting``; ``model`` is the base model.

A part of a file that lacks an expected key is skipped with a warning naming the file and the
part; a file from which no row can be read raises ``ValueError`` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from cellfoundry.bench.extract import Extractor
from cellfoundry.bench.lora_variants import LORA_VARIANTS
from cellfoundry.bench.rows import SummaryRow, compare_over_seeds, runnable_command

# Display names of the benchmarks' method and metric keys.
METHODS = {
    "lora": "LoRA",
    "lora_attention": "LoRA on attention only",
    "lora_fa_attention": "LoRA-FA on attention only",
    "full": "full fine-tuning",
    "linear_probe": "linear probe",
    "lora_no_adversary": "LoRA without batch adversary",
}
# the benchmarks' LoRA variants, each judged against full fine-tuning
LORA_MODES = tuple(LORA_VARIANTS)
ANNOTATION_METRICS = {"macro_f1": "macro-F1", "accuracy": "accuracy"}
INTEGRATION_METRICS = {
    "total": "scIB total",
    "bio": "bio conservation",
    "batch": "batch correction",
}
ZERO_SHOT_METRICS = {
    "knn_accuracy": "kNN accuracy",
    "knn_macro_f1": "kNN macro-F1",
    "nmi": "NMI",
    "ari": "ARI",
    "silhouette": "label silhouette",
}
ZERO_SHOT_BASELINE = "PCA baseline"  # zero_shot.py's PCA_NAME, its only baseline
RANDOM_INIT = "[random init]"  # zero_shot.py's control copies: controls, not methods of ours
SCVI = "scVI"  # finetune_integration.py keeps scVI outside the runs' baselines
FULL = "full fine-tuning"


@dataclass(frozen=True)
class Target:
    """A LoRA efficiency target, judged on LoRA's and full fine-tuning's means."""

    text: str
    met: Callable[[float, float], bool]


# The project's LoRA targets (the benchmarks do not record them). Trainable share and memory
# are read from finetune_memory.json; macro-F1 within one point of full fine-tuning from
# finetune_annotation.json, where LoRA and full fine-tuning run on the same splits.
F1_TARGET = Target(
    "LoRA macro-F1 within 1 point of full fine-tuning (LoRA >= full - 0.01)",
    lambda lora, full: lora >= full - 0.01,
)
MEMORY_TARGET = Target(
    ">= 40% less peak memory than full fine-tuning (LoRA/full <= 0.60)",
    lambda lora, full: lora <= 0.60 * full,
)
# memory-row key -> (display name, target or None); every one is lower-is-better
EFFICIENCY_METRICS: dict[str, tuple[str, Target | None]] = {
    "trainable_share": (
        "trainable parameter share",
        Target("LoRA trains <= 5% of the parameters", lambda lora, _full: lora <= 0.05),
    ),
    "peak_tensor_mib": ("peak tensor memory (MiB)", MEMORY_TARGET),
    # the whole process on CPU: shown beside it, but not what the target is judged on
    "peak_rss_mib": ("peak RSS (MiB)", None),
    "step_s": ("step time (s)", None),
}
# the benchmark's own LoRA/full ratios (of medians over rounds), by memory-row key
MEMORY_RATIOS = {
    "peak_tensor_mib": "peak_tensor_lora_over_full",
    "peak_rss_mib": "peak_rss_lora_over_full",
    "step_s": "step_time_lora_over_full",
}
# finetune_memory.json names sizes, not models: what finetune_memory.py builds for each size
MEMORY_MODELS = {"shipped": "cellfoundry-tiny-bert", "40M": "CellBert 40M (random init)"}

_SKIPPABLE = (KeyError, TypeError, IndexError, ValueError, AttributeError, ZeroDivisionError)


@dataclass
class Paired:
    """Per-seed values of one method of ours and of the benchmark's best baseline.

    ``names`` holds each seed's best baseline (a benchmark may choose per seed), ``ci95`` the
    run's own interval of ours minus it and ``verdicts`` the verdict the benchmark recorded
    for it (``None`` where it recorded none).
    """

    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    ci95: list[list[float] | None] = field(default_factory=list)
    verdicts: list[str | None] = field(default_factory=list)

    def add(
        self,
        ours: float,
        baseline: float,
        name: str,
        ci95: Sequence[float] | None = None,
        verdict: str | None = None,
    ) -> None:
        self.ours.append(float(ours))
        self.baseline.append(float(baseline))
        self.names.append(name)
        self.ci95.append([float(v) for v in ci95] if ci95 is not None else None)
        self.verdicts.append(verdict)


@dataclass
class Context:
    """What the rows of one results file (or dataset block) share, and what it skipped."""

    task: str
    source: str
    skipped: list[str]
    model: str = "not recorded"
    command: str = ""

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Skip a part that lacks an expected key, with a warning (never silently)."""
        try:
            yield
        except _SKIPPABLE as error:
            message = f"{self.source}: skipped {name} ({type(error).__name__}: {error})"
            self.skipped.append(message)
            warnings.warn(message, stacklevel=3)

    def row(
        self,
        setting: str,
        metric: str,
        higher_is_better: bool,
        pairs: Paired,
        notes: Sequence[str] = (),
        verdict: str | None = None,
    ) -> SummaryRow:
        """One row from paired per-seed values; ``verdict`` overrides the interval's."""
        # the first run's bootstrap: used for one seed, or seeds that left the values unchanged
        run_ci95 = pairs.ci95[0] if pairs.ci95 else None
        fields = compare_over_seeds(pairs.ours, pairs.baseline, higher_is_better, run_ci95)
        if verdict is not None:
            fields["verdict"] = verdict
        names = list(dict.fromkeys(pairs.names))
        notes = [n for n in notes if n]
        ci95, scale = fields["ci95"], max(1.0, abs(fields["difference"]))
        if fields["n_seeds"] > 1 and ci95 and ci95[1] - ci95[0] <= 1e-12 * scale:
            notes.append("the same difference in every seed (or round): a zero-width interval")
        if len(names) > 1:
            notes.append(
                "best baseline differs by seed, each seed paired with its own: "
                + ", ".join(f"#{i + 1} {name}" for i, name in enumerate(pairs.names))
            )
        recorded = [v for v in pairs.verdicts if v is not None]
        return SummaryRow(
            task=self.task,
            setting=setting,
            metric=metric,
            higher_is_better=higher_is_better,
            model=self.model,
            source=self.source,
            command=self.command,
            best_baseline=" / ".join(names),
            per_seed=recorded if len(recorded) == len(pairs.verdicts) else [],
            note="; ".join(notes),
            **fields,
        )


def _command(
    environment: Any, script: str, settings: Any, repeated: dict[str, str] | None = None
) -> str:
    """:func:`~cellfoundry.bench.rows.runnable_command` from a block's recorded environment and
    settings, the machine's folders (``out`` / ``work``) left out."""
    recorded = environment.get("command") if isinstance(environment, dict) else None
    return runnable_command(script, recorded, settings, skip=("out", "work"), repeated=repeated)


def _section(data: Any, key: str, kind: type, source: str) -> Any:
    """``data[key]``, or ``ValueError`` naming the file: without it nothing can be read."""
    if not isinstance(data, dict) or not isinstance(data.get(key), kind) or not data[key]:
        raise ValueError(f"{source}: not a readable results file (no '{key}' {kind.__name__})")
    return data[key]


def _finish(rows: list[SummaryRow], skipped: list[str], source: str) -> list[SummaryRow]:
    if not rows:
        reasons = "; ".join(skipped) or "nothing to compare"
        raise ValueError(f"{source}: no summary row could be read ({reasons})")
    return rows


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _benchmark_verdict(comparison: Any) -> list[str]:
    """The benchmark's own verdict over seeds, as a note."""
    verdict = comparison.get("verdict") if isinstance(comparison, dict) else None
    return [f"benchmark: {verdict}"] if verdict else []


# -- annotation and integration: runs of modes x seeds, baselines scored in each run -----------
Choice = Callable[[int, dict], "str | None"]
Outside = Callable[[int, str], "tuple[float, Sequence[float] | None] | None"]


def _run_pairs(
    runs: list[dict],
    mode: str,
    metric: str,
    choice: Choice,
    outside: Outside | None = None,
) -> Paired:
    """Pairs of one mode and metric from its runs' ``metrics.model`` / ``metrics.baselines``.

    ``choice(index, run)``: the benchmark's best baseline in that seed (``None``: the best
    mean over seeds); ``outside(index, name)``: value and interval of a baseline kept outside
    the runs (scVI), ``None`` for the runs' own. Runs of a mode are in seed order.
    """
    mine = [run for run in runs if run["mode"] == mode]
    chosen = [choice(index, run) for index, run in enumerate(mine)]
    if None in chosen:  # higher is better for every annotation / integration metric
        candidates = mine[0]["metrics"]["baselines"]
        means = {n: _mean([r["metrics"]["baselines"][n][metric] for r in mine]) for n in candidates}
        chosen = [name or max(means, key=means.__getitem__) for name in chosen]
    pairs = Paired()
    for index, (run, name) in enumerate(zip(mine, chosen, strict=True)):
        found = outside(index, name) if outside else None
        entry = run["metrics"].get("comparison", {}).get(metric, {})
        recorded = entry.get("best_baseline") == name  # the run's interval is against it
        if found is not None:
            value, ci95, verdict = *found, None
        else:
            value = run["metrics"]["baselines"][name][metric]
            ci95 = entry.get("ci95") if recorded else None
            verdict = entry.get("verdict") if recorded else None
        pairs.add(run["metrics"]["model"][metric], value, name, ci95, verdict)
    return pairs


def _run_choice(metric: str) -> Choice:
    """The best baseline a run recorded for ``metric`` (``None`` where it recorded none)."""

    def choice(_index: int, run: dict) -> str | None:
        return run["metrics"].get("comparison", {}).get(metric, {}).get("best_baseline")

    return choice


def _split_label(setting: dict) -> str:
    """'held-out batch', 'few-shot, 10 cells per type', 'random split', ..."""
    strategy = setting.get("strategy")
    if strategy == "holdout":
        return "held-out batch"
    if strategy == "few_shot" and "n_per_class" in setting:
        return f"few-shot, {setting['n_per_class']} cells per type"
    return setting.get("name") or f"{strategy} split"


def _block_context(task: str, source: str, skipped: list[str], block: dict, script: str) -> Context:
    """Model and command of one dataset block (these scripts record them per block)."""
    settings = block.get("settings", {})
    context = Context(task, source, skipped, settings.get("model") or "not recorded")
    context.command = _command(block.get("environment"), script, settings)
    return context


def run_that_made(block: dict, mode: str) -> dict:
    """The run (its ``settings`` and ``environment``) that made ``mode``'s results in an
    annotation block: an earlier run the block kept (``kept_from_previous_runs``), else the
    block's own."""
    for record in block.get("kept_from_previous_runs", []):
        if mode in record.get("modes", ()):
            return record
    return block


def _made_by(context: Context, block: dict, mode: str) -> Context:
    """``context`` with the command of the run that made ``mode``'s results."""
    record = run_that_made(block, mode)
    if record is block:
        return context
    command = _command(record.get("environment"), "finetune_annotation", record["settings"])
    return replace(context, command=command)


def extract_annotation(data: dict[str, Any], source: str) -> list[SummaryRow]:
    """Macro-F1 and accuracy of every fine-tuning mode against the better baseline."""
    rows: list[SummaryRow] = []
    skipped: list[str] = []
    for key, block in _section(data, "datasets", dict, source).items():
        context = _block_context("annotation", source, skipped, block, "finetune_annotation")
        with context.part(f"dataset '{key}'"):
            setting = block.get("setting") or block["split"]
            place = f"{key.split(' / ')[0]}, {_split_label(setting)}"
            notes = []
            if setting.get("strategy") == "holdout":
                notes.append("the same held-out test cells in every seed")
            comparisons = block.get("summary", {}).get("comparisons", {})
            for mode in dict.fromkeys(run["mode"] for run in block["runs"]):
                made_by = _made_by(context, block, mode)
                for metric, label in ANNOTATION_METRICS.items():
                    with context.part(f"'{key}' {mode} {metric}"):
                        pairs = _run_pairs(block["runs"], mode, metric, _run_choice(metric))
                        verdict = _benchmark_verdict(comparisons.get(f"{mode}/{metric}"))
                        setting_text = f"{place}, {METHODS.get(mode, mode)}"
                        rows.append(made_by.row(setting_text, label, True, pairs, notes + verdict))
            modes = {run["mode"] for run in block["runs"]}
            for lora in (m for m in LORA_MODES if {m, "full"} <= modes):
                with context.part(f"'{key}' {lora} vs full fine-tuning"):
                    made_by = _made_by(context, block, lora)
                    rows.append(_lora_against_full(made_by, block["runs"], lora, place, notes))
    return _finish(rows, skipped, source)


def _lora_against_full(
    context: Context, runs: list[dict], lora: str, place: str, notes: list[str]
) -> SummaryRow:
    """A LoRA variant's macro-F1 against full fine-tuning's on the same split, seed by seed,
    judged on the means by :data:`F1_TARGET` (an efficiency row: the third LoRA target)."""
    by_seed = {(run["mode"], run["seed"]): run["metrics"]["model"]["macro_f1"] for run in runs}
    seeds = sorted(seed for mode, seed in by_seed if mode == lora)
    pairs = Paired()
    for seed in seeds:
        pairs.add(by_seed[(lora, seed)], by_seed[("full", seed)], FULL)
    met = F1_TARGET.met(_mean(pairs.ours), _mean(pairs.baseline))
    efficiency = replace(context, task="efficiency")
    return efficiency.row(
        f"{place}, {METHODS[lora]}",
        "macro-F1 against full fine-tuning",
        True,
        pairs,
        [f"target: {F1_TARGET.text}", *notes],
        "target met" if met else "target missed",
    )


def _integration_choice(per_seed: Any) -> Choice:
    """The summary's best baseline of a seed (scVI where it beat the runs' best on total),
    else the run's own (chosen on total)."""

    def choice(index: int, run: dict) -> str | None:
        if isinstance(per_seed, list) and index < len(per_seed):
            return per_seed[index]["best_baseline"]
        return _run_choice("total")(index, run)

    return choice


def _scvi(block: dict, per_seed: Any, n_seeds: int, metric: str) -> Outside:
    """scVI's score and the benchmark's interval against it in a seed, by position: the
    benchmark appends one ``scvi_rows`` entry per seed, in seed order, without the seed."""
    scvi_rows = block.get("scvi_rows") or []

    def outside(index: int, name: str) -> tuple[float, Sequence[float] | None] | None:
        if name != SCVI:
            return None
        if len(scvi_rows) != n_seeds:
            raise ValueError(f"{len(scvi_rows)} scVI rows for {n_seeds} seeds: cannot pair")
        ci95 = per_seed[index].get("ci95") if isinstance(per_seed, list) else None
        return scvi_rows[index]["scores"][metric], ci95

    return outside


def extract_integration(data: dict[str, Any], source: str) -> list[SummaryRow]:
    """scIB total, bio and batch of every mode against the baseline best on total."""
    rows: list[SummaryRow] = []
    skipped: list[str] = []
    for key, block in _section(data, "datasets", dict, source).items():
        context = _block_context("integration", source, skipped, block, "finetune_integration")
        with context.part(f"dataset '{key}'"):
            place = f"{key}, {_split_label(block['split'])}"
            notes = ["best baseline chosen on scIB total in each seed (the benchmark's rule)"]
            if block.get("rescored"):
                notes.append(str(block["rescored"]))
            if not block.get("scvi_rows"):
                notes.append(f"scVI {block.get('scvi', 'not recorded')}")
            comparisons = block.get("summary", {}).get("comparisons", {})
            runs = block["runs"]
            for mode in dict.fromkeys(run["mode"] for run in runs):
                n_seeds = sum(run["mode"] == mode for run in runs)
                for metric, label in INTEGRATION_METRICS.items():
                    with context.part(f"'{key}' {mode} {metric}"):
                        recorded = comparisons.get(f"{mode}/{metric}", {})
                        per_seed = recorded.get("per_seed")
                        outside = _scvi(block, per_seed, n_seeds, metric)
                        pairs = _run_pairs(
                            runs, mode, metric, _integration_choice(per_seed), outside
                        )
                        verdict = _benchmark_verdict(recorded)
                        setting_text = f"{place}, {METHODS.get(mode, mode)}"
                        rows.append(context.row(setting_text, label, True, pairs, notes + verdict))
    return _finish(rows, skipped, source)


# -- zero-shot: representations scored over seeds on the same cells ----------------------------
def _per_seed(entry: dict) -> list[float]:
    """A metric's per-seed values; its single value where it has no seeds (silhouette)."""
    values = entry.get("per_seed")
    return [float(v) for v in values] if values else [float(entry["mean"])]


def _zero_shot_notes(
    representation: str, entry: dict, control: dict | None, n_seeds: int
) -> list[str]:
    """What the seeds vary, the benchmark's own test where it compared this representation,
    and the random-init control."""
    notes = ["seeds change only the kNN folds and KMeans, not the cells"] if n_seeds > 1 else []
    if entry.get("best_model_representation") == representation:
        notes.append(
            f"benchmark's best representation for this metric: seed-0 paired bootstrap over "
            f"cells {entry.get('seed0_difference')} {entry.get('seed0_ci95')}, "
            f"ahead: {entry.get('ahead')}"
        )
    if control is not None:
        notes.append(f"random-init control {control['mean']}")
    return notes


def extract_zero_shot(data: dict[str, Any], source: str) -> list[SummaryRow]:
    """Every pretrained representation (model x pooling) against PCA, per metric."""
    rows: list[SummaryRow] = []
    skipped: list[str] = []
    datasets = _section(data, "datasets", dict, source)
    command = _command(
        data.get("environment"), "zero_shot", data.get("settings"), repeated={"models": "--model"}
    )
    for key, block in datasets.items():
        context = Context("zero-shot", source, skipped, command=command)
        with context.part(f"dataset '{key}'"):
            results = {r["representation"]: r["metrics"] for r in block["results"]}
            pca = results[ZERO_SHOT_BASELINE]
            compared = {c["metric"]: c for c in block.get("comparison", [])}
            for representation, metrics in results.items():
                if representation == ZERO_SHOT_BASELINE or RANDOM_INIT in representation:
                    continue
                model, _, pooling = representation.removesuffix(")").rpartition(" (")
                controls = results.get(f"{model} {RANDOM_INIT} ({pooling})", {})
                context.model = model
                for metric, label in ZERO_SHOT_METRICS.items():
                    with context.part(f"'{key}' {representation} {metric}"):
                        ours, base = _per_seed(metrics[metric]), _per_seed(pca[metric])
                        if len(ours) != len(base):
                            raise ValueError(f"{len(ours)} vs {len(base)} seeds: cannot pair")
                        entry = compared.get(metric, {})
                        own = entry.get("best_model_representation") == representation
                        pairs = Paired()
                        for index, (mine, theirs) in enumerate(zip(ours, base, strict=True)):
                            ci95 = entry.get("seed0_ci95") if own and index == 0 else None
                            pairs.add(mine, theirs, ZERO_SHOT_BASELINE, ci95)
                        notes = _zero_shot_notes(
                            representation, entry, controls.get(metric), len(ours)
                        )
                        setting_text = f"{key}, {pooling} pooling"
                        rows.append(context.row(setting_text, label, True, pairs, notes))
    return _finish(rows, skipped, source)


# -- efficiency: LoRA against full fine-tuning over interleaved rounds -------------------------
def _round_values(entry: dict, metric: str) -> list[float]:
    """Per-round values of a memory row (rounds are repeats, LoRA and full interleaved), or
    the row's single figure where its rounds do not record the metric (trainable share)."""
    key = {"step_s": "step_s_median"}.get(metric, metric)
    rounds = entry.get("rounds") or []
    if rounds and all(key in r for r in rounds):
        return [float(r[key]) for r in rounds]
    return [float(entry[metric])]


def _memory_setting(size: str, checkpointing: bool, full: dict, settings: dict) -> str:
    """'shipped size (3.3M parameters), 8 cells x 256 tokens, checkpointing off', from what
    is recorded."""
    place = f"{size} size"
    if "parameters" in full:
        place += f" ({full['parameters'] / 1e6:.1f}M parameters)"
    if "batch_size" in settings and "mean_tokens" in full:
        place += f", {settings['batch_size']} cells x {full['mean_tokens']} tokens"
    return place + f", gradient checkpointing {'on' if checkpointing else 'off'}"


# finetune_memory.py's LoRA variants (every other mode is full fine-tuning) -> setting suffix
MEMORY_LORA_MODES = {m: "" if m == "lora" else f", {METHODS[m]}" for m in LORA_MODES}


def _memory_key(entry: dict) -> tuple[Any, bool, str]:
    """(size, checkpointing, mode) of a memory row or ratio; files before the attention-only
    variant recorded only ``lora`` rows and ratios without a mode."""
    return entry.get("size"), bool(entry.get("checkpointing")), entry.get("mode", "lora")


def _memory_row(
    context: Context, place: str, metric: str, lora: dict, full: dict, ratio: dict
) -> SummaryRow:
    """One efficiency row: a LoRA variant's metric against full fine-tuning, over rounds."""
    variant = METHODS[lora.get("mode", "lora")]
    label, target = EFFICIENCY_METRICS[metric]
    ours, base = _round_values(lora, metric), _round_values(full, metric)
    if len(ours) != len(base):
        raise ValueError(f"{len(ours)} LoRA vs {len(base)} full rounds")
    pairs = Paired()
    for mine, theirs in zip(ours, base, strict=True):
        pairs.add(mine, theirs, FULL)
    notes = [f"target: {target.text}"] if target else []
    notes.append(f"LoRA/full {_mean(ours) / _mean(base):.3f}")
    recorded = ratio.get(MEMORY_RATIOS.get(metric, ""))
    if recorded is not None:
        notes.append(f"benchmark's ratio of medians {recorded:.3f}")
    if len(ours) > 1:
        notes.append(f"{len(ours)} interleaved rounds (repeats, not seeds)")
    if metric == "peak_rss_mib":
        notes.append(
            "whole process on CPU (interpreter, libraries, allocator cache); "
            "the memory target is judged on peak tensor memory"
        )
    if metric == "trainable_share":
        notes.append(
            "target macro-F1 within 1 point of full fine-tuning: the annotation settings' "
            f"'macro-F1 against full fine-tuning' rows of {variant}"
        )
    verdict = None
    if target:
        verdict = "target met" if target.met(_mean(ours), _mean(base)) else "target missed"
    return context.row(place, label, False, pairs, notes, verdict)


def extract_memory(data: dict[str, Any], source: str) -> list[SummaryRow]:
    """Each LoRA variant's trainable share, memory and step time against full fine-tuning at
    the same size and gradient-checkpointing setting, with the LoRA targets' verdicts (judged
    on the means over rounds). The trainable share is given once per size and variant:
    checkpointing does not move it."""
    rows: list[SummaryRow] = []
    skipped: list[str] = []
    entries = [e for e in _section(data, "rows", list, source) if isinstance(e, dict)]
    settings = data.get("settings") or {}
    command = _command(data.get("environment"), "finetune_memory", settings)
    by_key = {_memory_key(e): e for e in entries}
    ratios = {_memory_key(r): r for r in data.get("ratios") or [] if isinstance(r, dict)}
    shares_given: set[tuple[Any, str]] = set()
    for size, checkpointing, mode in (k for k in by_key if k[2] in MEMORY_LORA_MODES):
        context = Context(
            "efficiency", source, skipped, MEMORY_MODELS.get(size, f"{size} model"), command
        )
        with context.part(f"size '{size}', checkpointing {checkpointing}, {mode}"):
            lora, full = by_key[(size, checkpointing, mode)], by_key[(size, checkpointing, "full")]
            place = _memory_setting(size, checkpointing, full, settings)
            place += MEMORY_LORA_MODES[mode]
            for metric in EFFICIENCY_METRICS:
                if metric == "trainable_share":
                    if (size, mode) in shares_given:
                        continue
                    shares_given.add((size, mode))
                with context.part(f"'{size}' {mode} {metric}"):
                    ratio = ratios.get((size, checkpointing, mode), {})
                    rows.append(_memory_row(context, place, metric, lora, full, ratio))
    return _finish(rows, skipped, source)


EXTRACTORS: dict[str, Extractor] = {
    "finetune_annotation": extract_annotation,
    "finetune_integration": extract_integration,
    "zero_shot": extract_zero_shot,
    "finetune_memory": extract_memory,
}
