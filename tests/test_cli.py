"""The `cellfoundry` command: tokenize (demo, summary, errors), build-tokenizer, info."""

from __future__ import annotations

import subprocess
from pathlib import Path

import datasets
from conftest import shared_file


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cellfoundry", *args], capture_output=True, text=True)


def test_tokenize_demo_with_summary(tmp_path):
    out = tmp_path / "tokens"
    result = _run(
        "tokenize",
        "demo",
        str(out),
        "--tokenizer",
        "cf-tiny-test",
        "--keep-obs",
        "tissue",
        "--max-length",
        "512",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "559/559 cells kept" in result.stdout and "cells/s" in result.stdout
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == 559 and set(ds.column_names) >= {"input_ids", "length", "tissue"}
    assert max(ds["length"]) == 512


def test_tokenize_bad_input_exit_code_and_message(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    result = _run("tokenize", str(bad), str(tmp_path / "out"), "--tokenizer", "cf-tiny-test")
    assert result.returncode == 2
    assert "error: Cannot read" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_build_tokenizer_and_info(tmp_path):
    from cellfoundry import demo_path

    result = _run(
        "build-tokenizer",
        str(demo_path()),
        "--id",
        "my-tok",
        "--out",
        str(tmp_path / "my-tok"),
        "--min-cells",
        "200",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "my-tok" / "README.md").read_text().startswith("# Tokenizer `my-tok`")
    info = _run("info")
    assert info.returncode == 0 and "cf-human-v1" in info.stdout and "torch" in info.stdout


def test_build_gene_maps_reproduces_shipped_files(tmp_path):
    import cellfoundry.genes

    source = shared_file("genes")
    result = _run("build-gene-maps", str(source), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    shipped = Path(cellfoundry.genes.__file__).parent / "_data" / "genes"
    produced = sorted(p.name for p in tmp_path.glob("*.gz"))
    assert produced == sorted(p.name for p in shipped.glob("*.gz"))
    for name in produced:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes()


def test_pretrain_subcommand_forwards_to_the_script_options(tmp_path):
    result = _run("pretrain", "--help")
    assert result.returncode == 0 and "--config" in result.stdout and "--resume" in result.stdout
    missing = _run("pretrain", "--config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml" in missing.stderr
