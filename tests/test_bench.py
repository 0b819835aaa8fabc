"""The benchmark harness: results schema on write, summary rows, SUMMARY.md with charts from
the committed results, model cards that embed their rows, and the smoke tier end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cellfoundry.bench.rows import compare_over_seeds, interval_verdict

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def test_results_are_validated_before_anything_is_written(tmp_path) -> None:
    from cellfoundry._benchmarking import write_report

    good = {"benchmark": "toy", "environment": {"command": "toy.py --seed 0"}, "value": 1.0}
    write_report(tmp_path / "toy.json", good, "# toy\n")
    assert json.loads((tmp_path / "toy.json").read_text())["value"] == 1.0
    with pytest.raises(ValueError, match=r"(?s)bad\.json .*'command' is a required property"):
        write_report(tmp_path / "bad.json", {"benchmark": "bad", "environment": {}}, "# bad\n")
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.md").exists()
    merged = {"benchmark": "merged", "datasets": {"a": {"environment": {"command": "x.py"}}}}
    write_report(tmp_path / "merged.json", merged, "")  # per-dataset commands are enough
    with pytest.raises(ValueError, match="datasets/a"):
        write_report(tmp_path / "m2.json", {"benchmark": "m2", "datasets": {"a": {}}}, "")


def test_every_committed_results_file_follows_the_schema() -> None:
    from cellfoundry.bench.schema import validate_results

    files = sorted(RESULTS.glob("*.json"))
    assert len(files) >= 10
    for path in files:
        if path.name != "summary.json":
            validate_results(json.loads(path.read_text()), path.name)


def test_rows_compare_paired_seeds_by_hand() -> None:
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.303 -> half 0.2484
    fields = compare_over_seeds([0.6, 0.7, 0.8], [0.5, 0.5, 0.5], higher_is_better=True)
    assert fields["difference"] == pytest.approx(0.2)
    assert fields["ci95"] == pytest.approx([0.2 - 0.24841, 0.2 + 0.24841], abs=1e-4)
    assert fields["verdict"] == "no difference" and fields["n_seeds"] == 3
    one = compare_over_seeds([0.30], [0.20], higher_is_better=False, run_ci95=[0.05, 0.15])
    assert one["ci95"] == [0.05, 0.15] and one["verdict"] == "worse"  # an MSE that grew
    assert interval_verdict([-0.3, -0.1], higher_is_better=False) == "better"
    assert interval_verdict(None, True) == "measured"


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    """SUMMARY.md, summary.json and charts generated from a copy of the committed results."""
    from cellfoundry.bench.summary import write_summary

    folder = tmp_path_factory.mktemp("results")
    for path in RESULTS.glob("*.json"):
        shutil.copy(path, folder / path.name)
    return folder, write_summary(folder)


def test_summary_has_a_table_per_task_with_verdicts_and_charts(summary) -> None:
    from cellfoundry.bench.schema import validate_summary

    folder, written = summary
    validate_summary(json.loads((folder / "summary.json").read_text()))
    tasks = {row["task"] for row in written["rows"]}
    assert {"tokenizer", "annotation", "integration", "perturbation", "grn", "niche"} <= tasks
    text = (folder / "SUMMARY.md").read_text()
    for task in tasks:
        assert f"\n## {task}\n" in text
    # the GRN methods lose to the baselines in most rows, and the summary says so
    grn = [r for r in written["rows"] if r["task"] == "grn"]
    assert sum(r["verdict"] == "worse" for r in grn) > sum(r["verdict"] == "better" for r in grn)
    section = text.split("\n## grn\n")[1].split("\n## ")[0]
    assert "the baselines win more often than we do" in section
    for row in written["rows"]:
        assert row["command"] and row["source"] in written["sources"]
    charts = sorted((folder / "charts").glob("*.png"))
    assert charts and all(p.stat().st_size > 10_000 for p in charts)
    assert "charts/grn_difference.png" in text


def test_cards_embed_their_summary_rows(summary, tmp_path) -> None:
    from cellfoundry.bench.cards import rows_for, summary_table

    _, written = summary
    rows = rows_for("cellfoundry-tiny-bert", "niche", written)
    assert rows and all(r["task"] == "niche" for r in rows)
    table = summary_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| niche |" in table
    assert rows_for("no-such-model", None, written) == []
    # a path to the shipped folder is the shipped model
    assert rows_for("/somewhere/cellfoundry-tiny-bert", "niche", written) == rows


def test_smoke_tier_runs_every_task_and_writes_the_summary(tmp_path, base_models) -> None:
    """CI's guard against a rotting harness: every task's scripts on tiny data, then
    SUMMARY.md, summary.json (schema-checked), the charts and the UMAP picture."""
    from cellfoundry.bench.schema import validate_summary
    from cellfoundry.bench.suite import TASKS, run_suite

    out = tmp_path / "results"
    outcome = run_suite("smoke", model=base_models["bert"], out=out, work=tmp_path / "w", jobs=2)
    assert [s["exit"] for s in outcome["steps"]] == [0] * len(outcome["steps"])
    assert {s["task"] for s in outcome["steps"]} == set(TASKS)
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    text = (out / "SUMMARY.md").read_text()
    tasks = {row["task"] for row in summary["rows"]}
    assert {"tokenizer", "annotation", "integration", "perturbation", "grn", "niche"} <= tasks
    assert all(f"\n## {task}\n" in text for task in tasks)
    assert (out / "charts" / "umap_starmap.png").stat().st_size > 10_000
    assert "charts/umap_starmap.png" in text
    models = {row["model"] for row in summary["rows"] if row["task"] == "niche"}
    assert models == {Path(base_models["bert"]).name}  # --model reached the scripts


def test_task_and_shipped_cards_show_the_published_rows(summary, tmp_path, monkeypatch) -> None:
    """A fine-tuned model's card shows its base model's rows for its task (where a baseline
    won, the verdict says so); a shipped model's card shows every row measured with it."""
    from cellfoundry.bench import cards
    from cellfoundry.hub import ModelCardInfo, model_path, render_model_card
    from cellfoundry.tasks import NicheConfig
    from cellfoundry.tasks.card import render_task_card

    _, written = summary
    package_file = tmp_path / "benchmark_summary.json"
    package_file.write_text(json.dumps(written))
    monkeypatch.setattr(cards, "PACKAGE_SUMMARY", package_file)
    niche_rows = cards.rows_for("cellfoundry-tiny-bert", "niche")
    assert niche_rows
    text = render_task_card(NicheConfig(base_model="cellfoundry-tiny-bert"), "my-niche-model")
    section = text.split("## The base model on this task in the benchmark summary")[1]
    assert section.count("| niche |") == len(niche_rows) and "| worse |" in section
    from transformers import AutoConfig

    import cellfoundry.models  # noqa: F401  (registers the model types)

    folder = model_path("cellfoundry-tiny-bert")
    card = render_model_card(
        AutoConfig.from_pretrained(folder), ModelCardInfo.load(folder), "cellfoundry-tiny-bert"
    )
    shipped = card.split("## Benchmark summary")[1].split("## Limitations")[0]
    assert shipped.count("\n| ") == len(cards.rows_for("cellfoundry-tiny-bert")) + 1  # + header
