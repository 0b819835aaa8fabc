"""Summary rows of the science benchmarks, checked against numbers read by hand from the results
files: the perturbation and unsupervised GRN files as committed, and frozen subsets of
grn_supervised.json and finetune_niche.json (those two are rewritten while benchmarks run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellfoundry.bench.extract.science import EXTRACTORS
from cellfoundry.bench.rows import SummaryRow
from cellfoundry.bench.schema import validate_summary

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
TARGET_DEGREE = "target degree (training edges)"


def _load(stem: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{stem}.json").read_text())


def _rows(stem: str, report: dict[str, Any]) -> list[SummaryRow]:
    return EXTRACTORS[stem](report, f"{stem}.json")


def _by(rows: list[SummaryRow], setting: str, metric: str) -> SummaryRow:
    (row,) = [r for r in rows if r.setting == setting and r.metric == metric]
    return row


def _schema_valid(rows: list[SummaryRow]) -> None:
    document = {"generated_utc": "", "environment": {}, "sources": {}}
    validate_summary({**document, "rows": [r.to_dict() for r in rows]})


def test_kang_perturbation_pairs_seeds_with_the_recorded_best_baseline():
    report = _load("finetune_perturbation")
    rows = _rows("finetune_perturbation", report)
    _schema_valid(rows)
    setting = "Kang IFN-beta, held-out clusters (3/seed)"
    assert [r.metric for r in rows] == [
        "l2_top1000",
        "pearson_delta",
        "pearson_delta_de20",
        "mse",
        "de_direction",
    ]
    runs = report["runs"]
    assert [r["seed"] for r in runs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    def per_seed(method: str, metric: str) -> list[float]:
        entries = [r["metrics"]["perturbations"]["IFN-beta"] for r in runs]
        values = [e["model"] if method == "model" else e["baselines"][method] for e in entries]
        return [np.mean([v[metric] for v in values[i : i + 3]]) for i in (0, 3, 6)]

    row = _by(rows, setting, "pearson_delta")
    assert row.ours == pytest.approx(np.mean(per_seed("model", "pearson_delta")))
    assert row.ours == pytest.approx(0.90070, abs=1e-5)
    assert row.best_baseline == "linear on PCA"  # named best in all 9 runs
    assert row.baseline == pytest.approx(np.mean(per_seed("linear on PCA", "pearson_delta")))
    assert row.higher_is_better and row.n_seeds == 3
    assert row.verdict == "no difference"
    assert len(row.per_seed) == 9
    assert row.per_seed[0] == "seed 0, cluster c2: worse (vs linear on PCA)"
    # every run paired with linear on PCA, three clusters per seed: the mean difference is
    # the mean of the runs' own differences, which the benchmark recorded
    for metric in ("l2_top1000", "pearson_delta", "mse"):
        recorded = report["mean_model_minus_best"][metric]
        assert _by(rows, setting, metric).difference == pytest.approx(recorded)
    for metric in ("l2_top1000", "mse"):
        assert not _by(rows, setting, metric).higher_is_better
    de20 = _by(rows, setting, "pearson_delta_de20")
    assert de20.best_baseline == "linear on PCA"  # 4 runs, train mean 3, latent arithmetic 2
    assert "linear on PCA 4, train mean 3, latent arithmetic (PCA) 2" in de20.note
    assert row.model == "cellfoundry-tiny-bert"
    assert row.command == "python benchmarks/finetune_perturbation.py"
    assert row.source == "finetune_perturbation.json"


def test_unseen_knockouts_one_row_per_metric_over_knockouts_and_seeds():
    report = _load("finetune_perturbation_unseen")
    rows = _rows("finetune_perturbation_unseen", report)
    _schema_valid(rows)
    setting = "Papalexi THP-1, unseen knockouts (6/seed)"
    row = _by(rows, setting, "pearson_delta")
    # the run's top-level pearson_delta is the model's mean over its held-out knockouts
    seed_means = [r["metrics"]["pearson_delta"] for r in report["runs"]]
    assert row.ours == pytest.approx(np.mean(seed_means))
    assert row.ours == pytest.approx(0.22153, abs=1e-5)
    assert row.best_baseline == "train mean"
    assert row.verdict == "worse" and row.n_seeds == 3
    assert len(row.per_seed) == 18
    assert "better 2, no difference 0, worse 16" in report["verdict"]
    assert "better 2, no difference 0, worse 16 (of 18)" in row.note
    mse = _by(rows, setting, "mse")
    assert not mse.higher_is_better
    assert mse.difference > 0 and mse.ci95[0] > 0 and mse.verdict == "worse"
    l2 = _by(rows, setting, "l2_top1000")
    assert "train mean 12, no change 4, linear (gene PCA) 2" in l2.note


def test_grn_rows_carry_the_recorded_regulator_bootstrap():
    report = _load("grn")
    rows = _rows("grn", report)
    _schema_valid(rows)
    assert len(rows) == 54  # 3 datasets x 2 golds x 3 model methods x 3 metrics
    expected = [
        (c["best_baseline"], [c["ci_low"], c["ci_high"]], c["verdict"])
        for entry in report["datasets"].values()
        for gold in entry["golds"].values()
        for metrics in gold["comparisons"].values()
        for c in metrics.values()
    ]
    assert [(r.best_baseline, r.ci95, r.verdict) for r in rows] == expected
    assert [(r.setting, r.metric) for r in rows if r.verdict == "better"] == [
        ("DLPFC Visium / DoRothEA A-C: embedding", "auroc")
    ]
    row = _by(rows, "Kang PBMC / DoRothEA A-C: embedding", "epr")
    embedding = report["datasets"]["kang"]["golds"]["DoRothEA A-C"]["methods"]["embedding"]
    assert row.ours == pytest.approx(np.mean([r["epr"] for r in embedding["runs"]]))
    assert row.ours == pytest.approx(4.717751479289941)
    assert row.best_baseline == "Spearman"
    assert row.baseline == pytest.approx(5.0547337278106514) and row.baseline_sd == 0.0
    assert row.difference == pytest.approx(row.ours - row.baseline)
    assert row.n_seeds == 3 and row.higher_is_better
    assert row.command.startswith("python benchmarks/grn.py --supervised-datasets")


def _supervised_run(
    seed: int,
    model: tuple[float, float],
    spearman: tuple[float, float],
    degree: tuple[float, float],
    comparison: list[tuple[float, float, float, str]],
) -> dict[str, Any]:
    """A pair-classifier run as grn.py records it, epr and auroc only."""

    def values(pair: tuple[float, float]) -> dict[str, float]:
        return dict(zip(("epr", "auroc"), pair, strict=True))

    compared = {
        metric: {"best_baseline": TARGET_DEGREE, "difference": d, "ci95": [lo, hi], "verdict": v}
        for metric, (d, lo, hi, v) in zip(("epr", "auroc"), comparison, strict=True)
    }
    metrics = {
        "model": values(model),
        "baselines": {"Spearman": values(spearman), TARGET_DEGREE: values(degree)},
        "comparison": compared,
    }
    return {"seed": seed, "metrics": metrics}


# grn_supervised.json at commit 2c47178 (Kang 3 seeds, Liao 1 of 3), epr and auroc only
GRN_SUPERVISED = {
    "benchmark": "grn_supervised",
    "settings": {"seeds": [0, 1, 2], "model": "cellfoundry-tiny-bert"},
    "environment": {
        "command": "grn.py --datasets kang liao dlpfc --supervised-only --supervised-datasets "
        "kang liao dlpfc --reuse-runs"
    },
    "datasets": {},
    "supervised": {
        "kang": [
            _supervised_run(
                0,
                (12.49064331614999, 0.6961106352195662),
                (1.135513028740908, 0.6163200321792773),
                (12.833200319233839, 0.8077332931794358),
                [
                    (-0.34255700308384895, -9.34137859064013, 8.6161878632646, "no difference"),
                    (-0.11162265795986959, -0.18248771050543622, -0.034592185241203346, "worse"),
                ],
            ),
            _supervised_run(
                1,
                (10.982856362270336, 0.7378602917911031),
                (0.0, 0.605526869213931),
                (10.828282828282829, 0.8244416606811152),
                [
                    (0.15457353398750762, -5.874416579418991, 5.457803558168937, "no difference"),
                    (-0.08658136889001211, -0.1992822061250161, -0.03158185397093045, "worse"),
                ],
            ),
            _supervised_run(
                2,
                (2.917006802721089, 0.5897345554810344),
                (4.375510204081633, 0.5894650868171994),
                (6.806349206349207, 0.760553841567926),
                [
                    (-3.889342403628118, -10.995462821684399, 3.574387456110119, "no difference"),
                    (-0.17081928608689168, -0.2408042917676694, -0.10160901941363529, "worse"),
                ],
            ),
        ],
        "liao": [
            _supervised_run(
                0,
                (2.754939660315247, 0.542404071758987),
                (2.3311027894975167, 0.5652983684617342),
                (9.67905017234776, 0.7842200644054195),
                [
                    (-6.924110512032512, -9.591165420916841, -4.978155968055444, "worse"),
                    (-0.2418159926464325, -0.28619732133331516, -0.18781879231932047, "worse"),
                ],
            )
        ],
    },
}


def test_grn_supervised_pairs_per_seed_and_uses_the_run_interval_for_one_seed():
    rows = _rows("grn_supervised", GRN_SUPERVISED)
    _schema_valid(rows)
    assert len(rows) == 4
    kang = "Kang PBMC / DoRothEA A-C, held-out TFs: pair classifier"
    auroc = _by(rows, kang, "auroc")
    assert auroc.ours == pytest.approx(
        np.mean([0.6961106352195662, 0.7378602917911031, 0.5897345554810344])
    )
    assert auroc.best_baseline == TARGET_DEGREE
    assert auroc.baseline == pytest.approx(
        np.mean([0.8077332931794358, 0.8244416606811152, 0.760553841567926])
    )
    assert auroc.n_seeds == 3 and auroc.verdict == "worse" and auroc.ci95[1] < 0
    assert auroc.per_seed == [f"seed {s}: worse (vs {TARGET_DEGREE})" for s in (0, 1, 2)]
    assert _by(rows, kang, "epr").verdict == "no difference"
    liao = _by(rows, "Liao BALF / DoRothEA A-C, held-out TFs: pair classifier", "epr")
    assert liao.n_seeds == 1 and liao.ours_sd == 0.0
    assert liao.ci95 == [-9.591165420916841, -4.978155968055444]  # the run's bootstrap
    assert liao.difference == pytest.approx(-6.924110512032512)
    assert liao.verdict == "worse"
    assert "1 of the 3 seeds" in liao.note
    assert liao.command == (
        "python benchmarks/grn.py --datasets kang liao dlpfc --supervised-only "
        "--supervised-datasets kang liao dlpfc --reuse-runs"
    )


def _niche_run(
    seed: int, context: str, model: float, knn: float, mean: float, compared: tuple
) -> dict[str, Any]:
    """A starmap-density run as finetune_niche.py records it (two of its four baselines)."""
    difference, low, high, verdict = compared
    comparison = {
        "best_baseline": "kNN (PCA, own)",
        "difference": difference,
        "ci95": [low, high],
        "verdict": verdict,
    }
    metrics = {
        "model": {"mse": model},
        "baselines": {"kNN (PCA, own)": {"mse": knn}, "training mean": {"mse": mean}},
        "comparison": {"mse": comparison},
    }
    return {"seed": seed, "context": context, "metrics": metrics}


# finetune_niche.json at commit 2c47178, starmap-density only
NICHE = {
    "benchmark": "finetune_niche",
    "settings": {
        "settings": ["starmap-composition", "starmap-density"],
        "seeds": [0, 1, 2],
        "model": "cellfoundry-tiny-bert",
    },
    "environment": {"command": "finetune_niche.py --settings starmap-composition starmap-density"},
    "results": {
        "starmap-density": {
            "runs": [
                _niche_run(
                    0,
                    "own",
                    0.11894150078296661,
                    0.10715368390083313,
                    0.11401348561048508,
                    (0.011787816882133484, 0.00516900047659874, 0.020211231522262087, "worse"),
                ),
                _niche_run(
                    0,
                    "neighbours",
                    0.0919683650135994,
                    0.10715368390083313,
                    0.11401348561048508,
                    (-0.015185318887233734, -0.027574276179075242, -0.005748100951313974, "better"),
                ),
                _niche_run(
                    1,
                    "own",
                    0.10663408041000366,
                    0.10686885565519333,
                    0.11263833194971085,
                    (
                        -0.00023477524518966675,
                        -0.005982370115816593,
                        0.0059994064271450005,
                        "no difference",
                    ),
                ),
                _niche_run(
                    1,
                    "neighbours",
                    0.09261013567447662,
                    0.10686885565519333,
                    0.11263833194971085,
                    (-0.014258719980716705, -0.02705776635557413, -0.0032743478193879134, "better"),
                ),
                _niche_run(
                    2,
                    "own",
                    0.10661886632442474,
                    0.10492394119501114,
                    0.11306705325841904,
                    (
                        0.0016949251294136047,
                        -0.003945213742554188,
                        0.007518307119607924,
                        "no difference",
                    ),
                ),
                _niche_run(
                    2,
                    "neighbours",
                    0.09624288976192474,
                    0.10492394119501114,
                    0.11306705325841904,
                    (
                        -0.008681051433086395,
                        -0.019736273214221,
                        0.003830114193260662,
                        "no difference",
                    ),
                ),
            ]
        }
    },
}


def test_niche_mse_lower_is_better():
    rows = _rows("finetune_niche", NICHE)
    _schema_valid(rows)
    assert [(r.setting, r.metric) for r in rows] == [
        ("starmap-density (own)", "mse"),
        ("starmap-density (+ neighbours)", "mse"),
    ]
    own, neighbours = rows
    assert own.ours == pytest.approx(
        np.mean([0.11894150078296661, 0.10663408041000366, 0.10661886632442474])
    )
    assert own.best_baseline == "kNN (PCA, own)" and own.verdict == "no difference"
    assert not neighbours.higher_is_better
    # lower MSE than the best baseline in every seed: the interval lies below 0, "better"
    assert neighbours.ci95[1] < 0 and neighbours.verdict == "better"
    assert neighbours.per_seed == [
        "seed 0: better (vs kNN (PCA, own))",
        "seed 1: better (vs kNN (PCA, own))",
        "seed 2: no difference (vs kNN (PCA, own))",
    ]
    assert own.command == (
        "python benchmarks/finetune_niche.py --settings starmap-composition starmap-density"
    )
    assert own.note == ""


def test_one_seed_uses_the_run_interval_and_fallbacks_are_noted():
    run = _niche_run(0, "own", 0.10, 0.12, 0.15, (-0.02, -0.03, -0.01, "better"))
    region = {
        "model": {"macro_f1": 0.40},
        "baselines": {"logistic (PCA, own)": {"macro_f1": 0.55}, "majority": {"macro_f1": 0.1}},
        "comparison": {
            "macro_f1": {
                "best_baseline": "logistic (PCA, own)",
                "difference": -0.15,
                "ci95": [-0.2, -0.1],
                "verdict": "worse",
            }
        },
    }
    report = {
        "benchmark": "finetune_niche",
        "settings": {"settings": ["starmap-composition"], "seeds": [0], "model": "m"},
        "environment": {"command": "finetune_niche.py --settings starmap-composition"},
        "results": {
            "starmap-density": {"runs": [run]},
            "seqfish-region": {"runs": [{"seed": 0, "context": "own", "metrics": region}]},
        },
    }
    density, region_row = _rows("finetune_niche", report)
    assert density.n_seeds == 1 and density.ours_sd == 0.0 and density.baseline_sd == 0.0
    assert density.ci95 == [-0.03, -0.01] and density.difference == pytest.approx(-0.02)
    assert density.verdict == "better" and not density.higher_is_better
    assert "one seed: ci95 is the run's paired bootstrap" in density.note
    # not run by the recorded invocation: the script's default command for that setting
    assert density.command == "python benchmarks/finetune_niche.py --settings starmap-density"
    assert "earlier invocation" in density.note
    assert region_row.higher_is_better and region_row.verdict == "worse"

    # no comparison recorded: the baseline with the best mean in the metric's direction
    entry = {"model": {"l2_top1000": 3.0}, "baselines": {"a": {"l2_top1000": 5.0}}}
    entry["baselines"]["b"] = {"l2_top1000": 4.0}
    kang = {
        "settings": {"model": "m", "seeds": [0], "out": "/somewhere"},
        "runs": [{"seed": 0, "cluster": "c0", "metrics": {"perturbations": {"X": entry}}}],
    }
    (row,) = _rows("finetune_perturbation", kang)
    assert row.best_baseline == "b" and row.difference == pytest.approx(-1.0)
    assert row.ci95 is None and row.verdict == "measured"
    assert "no best baseline recorded" in row.note
    assert row.command == "python benchmarks/finetune_perturbation.py --model m --seeds 0"


def test_a_unit_without_a_finite_value_is_left_out_and_noted():
    def run(seed: int, ours: float) -> dict[str, Any]:
        entry = {
            "model": {"pearson_delta": ours},
            "baselines": {"train mean": {"pearson_delta": 0.5}},
            "comparison": {"pearson_delta": {"best_baseline": "train mean", "verdict": "worse"}},
        }
        return {"seed": seed, "metrics": {"perturbations": {"KO": entry}}}

    report = {"settings": {"model": "m"}, "runs": [run(0, 0.25), run(1, float("nan"))]}
    (row,) = _rows("finetune_perturbation_unseen", report)
    assert row.ours == 0.25 and row.n_seeds == 1 and row.verdict == "measured"
    assert "left out, ours not a finite number: seed 1, KO" in row.note
    assert "one seed: no interval" in row.note  # the run recorded no interval


@pytest.mark.parametrize("stem", ["grn_supervised", "finetune_niche"])
def test_current_files_of_running_benchmarks_extract(stem):
    """These files change while benchmarks run; whatever they hold now must extract."""
    rows = _rows(stem, _load(stem))
    assert rows
    _schema_valid(rows)


@pytest.mark.parametrize("stem", sorted(EXTRACTORS))
def test_unreadable_file_names_the_file(stem):
    with pytest.raises(ValueError, match=f"{stem}.json"):
        _rows(stem, {"benchmark": stem, "something": 1})
    with pytest.raises(ValueError, match=f"{stem}.json"):
        EXTRACTORS[stem]([1, 2], f"{stem}.json")
