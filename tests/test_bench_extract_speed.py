"""Speed / memory extractors on the committed results files and on tiny hand-made reports.

The committed-file tests pin figures read off the JSON by hand, and verdicts to the file's own
``meets_target``; the hand-made reports check a missed target (or its absence) is reported as
recorded, and that unreadable files fail loudly with their name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellfoundry.bench.extract.speed import (
    EXTRACTORS,
    embedding_rows,
    encoder_rows,
    in_silico_rows,
    tokenizer_rows,
)
from cellfoundry.bench.rows import SummaryRow, runnable_command
from cellfoundry.bench.schema import validate_summary

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
MIB = 2**20


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def pick(rows: list[SummaryRow], setting: str, metric: str) -> SummaryRow:
    """The one row with this setting and metric."""
    found = [r for r in rows if r.setting == setting and r.metric == metric]
    assert len(found) == 1, [(r.setting, r.metric) for r in rows]
    return found[0]


def meets(report: dict, target_text: str) -> str:
    """The file's own meets_target for a target, as a verdict."""
    (target,) = [t for t in report["targets"] if t["target"] == target_text]
    return "target met" if target["meets_target"] else "target missed"


def assert_valid(rows: list[SummaryRow]) -> None:
    validate_summary(
        {"generated_utc": "", "environment": {}, "sources": {}, "rows": [r.to_dict() for r in rows]}
    )


# -- tokenizer -------------------------------------------------------------------------------
def test_tokenizer_committed_file():
    report = load("tokenizer_throughput.json")
    rows = tokenizer_rows(report, "tokenizer_throughput.json")
    assert_valid(rows)
    assert {r.task for r in rows} == {"tokenizer"} and {r.model for r in rows} == {""}
    assert rows[0].command == (
        "python benchmarks/tokenizer_throughput.py --n-cells 100000 --scale-cells 300000 "
        "--reference-cells 2000 --seed 0 --repeats 5 --tokenizer cf-human-v1 --profile"
    )
    numba, numpy = (f"cf-human-v1, 100,000 cells, {b} backend" for b in ("numba", "numpy"))

    wall = pick(rows, numba, "cells/s, launch to exit")
    assert wall.ours == 13172.0 and wall.higher_is_better and wall.baseline is None
    text = "end-to-end cells/s, numba, wall from launch to exit (1 process)"
    assert wall.verdict == meets(report, text) == "target met"
    slow = pick(rows, numpy, "cells/s, launch to exit")
    assert slow.ours == 9488.6
    text = "end-to-end cells/s, numpy fallback, wall from launch to exit"
    assert slow.verdict == meets(report, text) == "target missed"
    stretch = pick(rows, numba, "cells/s, launch to exit (stretch target)")
    assert stretch.verdict == meets(report, "stretch: end-to-end cells/s, numba, wall")
    assert stretch.verdict == "target missed"
    assert pick(rows, numpy, "cells/s, CLI-reported").verdict == "measured"  # no target for it

    helical = pick(rows, numba, "cells/s, numba vs helical 2.2.0 peer figure")
    assert (helical.ours, helical.baseline) == (13172.0, 3020.0)
    assert helical.best_baseline == "helical 2.2.0 (peer figure)" and helical.difference is None
    assert helical.verdict == "target met" and "4.36x" in helical.note
    assert "not measured in this run" in helical.note

    rss = pick(rows, numba, "peak RSS (MiB)")
    assert rss.ours == 573845504 / MIB and not rss.higher_is_better
    assert rss.verdict == meets(report, "peak RSS at 100,000 cells, numba")
    scale = pick(rows, "cf-human-v1, numba backend", "peak RSS (MiB), 300,000 vs 100,000 cells")
    assert (scale.ours, scale.baseline) == (559325184 / MIB, 557936640 / MIB)
    assert scale.verdict == "target met" and "ratio 1.002" in scale.note
    parity = pick(
        rows,
        "cf-human-v1, 2,000 reference cells, numba and numpy",
        "fraction of cells whose tokens equal the reference",
    )
    assert parity.ours == 1.0 and parity.verdict == "target met"
    assert len(rows) == 11


def test_tokenizer_missed_target_is_reported_as_recorded():
    report = {
        "benchmark": "tokenizer_throughput",
        "arguments": {"n_cells": 10, "profile": False, "_backend": "numba", "out": "/x.json"},
        "end_to_end": {
            "numba": {
                "n_cells_in": 10,
                "wall_cells_per_s": 12.5,
                "cli_cells_per_s": 20.0,
                "peak_rss_bytes": 3 * MIB,
            }
        },
        "targets": [
            {
                "target": "end-to-end cells/s, numba, wall from launch to exit (1 process)",
                "threshold": ">= 10,000",
                "measured": 12.5,
                "meets_target": False,
            }
        ],
    }
    rows = tokenizer_rows(report, "t.json")
    assert [r.verdict for r in rows] == ["target missed", "measured", "measured"]
    assert rows[0].ours == 12.5 and rows[2].ours == 3.0
    assert rows[0].command == "python benchmarks/tokenizer_throughput.py --n-cells 10"


# -- encoder ---------------------------------------------------------------------------------
def test_encoder_committed_file():
    report = load("encoder_throughput_cpu.json")
    rows = encoder_rows(report, "encoder_throughput_cpu.json")
    assert_valid(rows)
    assert len(rows) == 51  # 10M: 2 modes x 5 L x 3 pairs; 40M forward 4 L, train 3 L
    assert {r.verdict for r in rows} == {"measured"}  # the benchmark records no target
    assert rows[0].command == "python benchmarks/encoder_throughput.py --time-budget-s 1500"
    row = pick(rows, "10M, forward, L=1024, cpu float32", "tokens/s, sdpa vs eager")
    assert row.ours == 1574.5329722977037 and row.baseline == 1230.2820745571225
    assert row.best_baseline == "eager" and row.higher_is_better
    mamba = pick(rows, "40M, forward+backward, L=1024, cpu float32", "tokens/s, mamba vs sdpa")
    ratio = report["summary"]["40M/train"]["ratios"]["1024"]["mamba/sdpa"]
    assert mamba.ours / mamba.baseline == pytest.approx(ratio)
    assert not [r for r in rows if r.setting.startswith("40M, forward+backward, L=2048")]
    assert "sdpa L=2048 (time budget" in mamba.note and "no crossover measured" in mamba.note
    assert "no CUDA device" in rows[0].note  # file-wide item: on the first size and mode
    assert "no CUDA device" not in mamba.note


def test_encoder_without_target_or_crossover_is_measured():
    def result(backend: str, tokens_per_s: float) -> dict:
        return {"size": "10M", "mode": "forward", "backend": backend, "length": 256} | {
            "tokens_per_s": tokens_per_s
        }

    report = {
        "benchmark": "encoder_throughput",
        "environment": {"device": "cuda", "dtype": "bfloat16", "command": "encoder_throughput.py"},
        "settings": {"batch_size": 1, "repeats": 2},
        "results": [result("eager", 200.0), result("sdpa", 100.0)],  # sdpa slower than eager
        "summary": {
            "10M/forward": {
                "ratios": {"256": {"sdpa/eager": 0.5}},
                "crossover_length": 512,
                "crossover_note": "Mamba >= best attention backend from L=512 on",
            }
        },
        "not_measured": [
            {"size": "10M", "backend": "mamba", "mode": "forward", "length": 256, "reason": "OOM"}
        ],
        "not_measured_summary": ["10M mamba forward L=256: OOM"],
    }
    speed, crossover = encoder_rows(report, "encoder_throughput_cuda.json")
    assert (speed.ours, speed.baseline, speed.verdict) == (100.0, 200.0, "measured")
    assert speed.setting == "10M, forward, L=256, cuda bfloat16"
    assert speed.note.endswith("not measured: mamba L=256 (OOM)")
    assert crossover.ours == 512.0 and crossover.baseline is None


def test_encoder_key_matches_every_device_stem():
    for stem in ("encoder_throughput_cpu", "encoder_throughput_cuda", "encoder_throughput_gpu"):
        assert [k for k in EXTRACTORS if stem.startswith(k + "_")] == ["encoder_throughput"]


# -- embedding -------------------------------------------------------------------------------
def test_embedding_committed_file():
    report = load("embedding_throughput.json")
    rows = embedding_rows(report, "embedding_throughput.json")
    assert_valid(rows)
    setting = "500 cells, batch 24, mean pooling, CPU only, float32"
    assert rows[0].command == "python benchmarks/embedding_throughput.py"
    speed = pick(rows, setting, "cells/s (read + load + tokenize + forward)")
    assert (speed.ours, speed.baseline) == (5.0, 1.35)
    text = "cells/s, cellfoundry / baseline (read + load + tokenize + forward)"
    assert speed.verdict == meets(report, text) == "target met" and "3.704x" in speed.note
    wall = pick(rows, setting, "cells/s, launch to exit")
    assert (wall.ours, wall.baseline) == (4.55, 1.32)
    text = "cells/s, cellfoundry / baseline (launch-to-exit wall, imports included)"
    assert wall.verdict == meets(report, text)
    cpu = pick(rows, setting, "cells per CPU-second")
    assert (cpu.ours, cpu.baseline, cpu.verdict) == (4.56, 1.2, "measured")
    rss = pick(rows, setting, "peak RSS (MiB)")
    assert (rss.ours, rss.baseline) == (1256009728 / MIB, 5942493184 / MIB)
    assert not rss.higher_is_better
    text = "peak RSS, cellfoundry / baseline (ru_maxrss of each child)"
    assert rss.verdict == meets(report, text) == "target met"


def test_embedding_missed_target_is_reported_as_recorded():
    side = {"cells_per_s": 2.0, "peak_rss_bytes": MIB}
    report = {
        "benchmark": "embedding_throughput",
        "settings": {"cells": 8, "batch_size": 4, "pooling": "mean", "baseline_padding": "max"},
        "sides": {"cellfoundry": side, "baseline": {"cells_per_s": 1.0, "peak_rss_bytes": MIB}},
        "targets": [
            {
                "target": "cells/s, cellfoundry / baseline (read + load + tokenize + forward)",
                "threshold": ">= 3.0x",
                "measured": 2.0,
                "meets_target": False,
            }
        ],
    }
    speed, rss = embedding_rows(report, "e.json")
    assert (speed.ours, speed.baseline, speed.verdict) == (2.0, 1.0, "target missed")
    assert (rss.ours, rss.verdict) == (1.0, "measured")


# -- in-silico -------------------------------------------------------------------------------
def test_in_silico_committed_file():
    rows = in_silico_rows(load("in_silico_memory.json"), "in_silico_memory.json")
    assert_valid(rows)
    assert len(rows) == 6 and {r.verdict for r in rows} == {"measured"}
    row = pick(rows, "270 cells, batch 16", "peak RSS (MiB)")
    assert row.ours == 798.5 and not row.higher_is_better and row.baseline is None
    assert row.model == "cellfoundry-tiny-bert"
    assert row.command == "python benchmarks/in_silico_memory.py --cells 30 90 270"
    assert "Not compared with Geneformer" in row.note


def test_in_silico_records_no_target():
    report = {"rows": [{"cells": 5, "batch_size": 2, "peak_rss_mib": 10.0, "wall_s": 1.0}]}
    (row,) = in_silico_rows(report, "m.json")
    assert (row.ours, row.verdict, row.model) == (10.0, "measured", "")
    assert row.command == "python benchmarks/in_silico_memory.py"


# -- unreadable files ------------------------------------------------------------------------
@pytest.mark.parametrize("extract", list(EXTRACTORS.values()))
@pytest.mark.parametrize("report", [{}, {"end_to_end": 3, "rows": [{"cells": None}]}, []])
def test_unreadable_file_raises_naming_it(extract, report):
    with pytest.raises(ValueError, match="broken.json"):
        extract(report, "broken.json")


def test_other_benchmark_is_refused():
    with pytest.raises(ValueError, match="grn.json.*'grn'"):
        tokenizer_rows({"benchmark": "grn"}, "grn.json")


# -- runnable_command (shared by every extractor) --------------------------------------------
def test_runnable_command_each_behaviour():
    base = "python benchmarks/bench.py"
    # a recorded bare "script.py args" gets the folder; other recorded commands stay as they are
    assert runnable_command("bench", "bench.py --n 3") == f"{base} --n 3"
    assert runnable_command("bench", "other.py") == "python benchmarks/other.py"
    for kept in ("python benchmarks/bench.py --n 3", "benchmarks/bench.py", "cellfoundry embed x"):
        assert runnable_command("bench", kept, {"n": 9}) == kept
    # no recorded command (None, empty, blank, not a string): rebuilt from the arguments
    for missing in (None, "", "   ", ["bench.py"]):
        assert runnable_command("bench", missing, {"n": 9}) == f"{base} --n 9"
    assert runnable_command("bench", None) == base
    assert runnable_command("bench", None, "not a dict") == base
    arguments = {
        "out": "/tmp/out",  # skipped by key
        "_backend": "rust",  # private
        "seed": None,  # None and False dropped
        "quick": False,
        "profile": True,  # bare flag
        "batch_size": 8,  # underscores become dashes
        "lengths": [256, 512],  # space-separated values
        "few_shot": [],  # empty list: the bare flag
        "learning_rate": {"lora": 1e-4},  # dict skipped
        "models": ["a", "b"],  # one flag per item
    }
    assert runnable_command(
        "bench", None, arguments, skip=("out",), repeated={"models": "--model"}
    ) == (f"{base} --profile --batch-size 8 --lengths 256 512 --few-shot --model a --model b")
    # without skip / repeated: "out" is kept and "models" is an ordinary list
    assert runnable_command("bench", None, {"out": "o", "models": ["a", "b"]}) == (
        f"{base} --out o --models a b"
    )
