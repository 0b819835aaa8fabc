"""In-silico perturbation on real Kang PBMC cells: token edits, resumable units, batch-size
independence, the CLI, and clear errors for unknown genes and missing control cells."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_model, shared_file

from cellfoundry.in_silico import TargetState, _perturbed, in_silico_perturbation

TARGET = TargetState("perturbation", "control", "IFN-beta")
GENES = ["ISG15", "IFI6", "FTL"]


@pytest.fixture(scope="module")
def kang_file(tmp_path_factory):
    """30 control and 30 IFN-beta-stimulated Kang PBMCs (raw counts), as an .h5ad."""
    adata = ad.read_h5ad(shared_file("pert_kang2018_ifnb_pbmc.h5ad"))
    rng = np.random.default_rng(0)
    control = adata.obs["perturbation"].to_numpy() == "control"
    keep = np.concatenate(
        [
            rng.choice(np.flatnonzero(control), 30, replace=False),
            rng.choice(np.flatnonzero(~control), 30, replace=False),
        ]
    )
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    adata[np.sort(keep)].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory, human_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("model"), "bert", human_tokenizer)


def run(kang_file, bert, folder, **changes):
    settings = {
        "model": bert,
        "target": TARGET,
        "max_length": 64,
        "batch_size": 4,
        "genes_per_unit": 2,
        "cells_per_unit": 8,
        "progress": False,
    }
    return in_silico_perturbation(kang_file, GENES, folder, **{**settings, **changes})


def test_token_edits_delete_move_and_insert() -> None:
    cell = np.array([2, 50, 60, 70, 80])
    ids, origin = _perturbed(cell, 70, "delete", 5)
    assert ids.tolist() == [2, 50, 60, 80] and origin.tolist() == [0, 1, 2, 4]
    assert _perturbed(cell, 99, "delete", 5) is None  # not expressed: nothing to delete
    ids, origin = _perturbed(cell, 70, "overexpress", 5)
    assert ids.tolist() == [2, 70, 50, 60, 80] and origin.tolist() == [0, 3, 1, 2, 4]
    ids, origin = _perturbed(cell, 99, "overexpress", 5)  # inserted; the last token falls out
    assert ids.tolist() == [2, 99, 50, 60, 70] and origin.tolist() == [0, -1, 1, 2, 3]


def test_deletion_scores_every_control_cell_holding_the_gene_and_resumes(
    tmp_path, kang_file, bert, human_tokenizer
) -> None:
    result = run(kang_file, bert, tmp_path / "run")
    assert list(result.genes.columns[:4]) == ["gene", "token", "ensembl_id", "n_cells"]
    # n_cells is exactly the control cells whose first 64 tokens hold the gene.
    from cellfoundry.tokenization import TokenizeOptions, tokenize_to_table

    adata = ad.read_h5ad(kang_file)
    control = adata[adata.obs["perturbation"] == "control"].copy()
    table, _ = tokenize_to_table(control, human_tokenizer, TokenizeOptions(max_length=64))
    tokens = dict(zip(result.genes["gene"], result.genes["token"], strict=True))
    for gene in GENES:
        holding = sum(tokens[gene] in ids for ids in table.column("input_ids").to_pylist())
        assert result.genes.set_index("gene").loc[gene, "n_cells"] == holding
    assert (result.genes["n_cells"] > 0).any()
    cells = result.cells
    assert set(cells["cell"]) <= set(control.obs_names)
    assert (cells["cell_shift"] >= -1e-6).all() and cells["target_shift"].notna().all()
    assert {"affected_symbol", "shift_mean"} <= set(result.affected.columns)
    on_disk = pd.read_csv(tmp_path / "run" / "genes.tsv", sep="\t")
    assert on_disk["gene"].tolist() == result.genes["gene"].tolist()

    # An interrupted run: one unit's shard lost; the rerun recomputes only it, same tables.
    shards = sorted((tmp_path / "run" / "shards").glob("*.npz"))
    assert len(shards) == 2 * 4  # 2 gene units x 4 cell units of 8 (30 control cells)
    shards[3].unlink()
    again = run(kang_file, bert, tmp_path / "run")
    pd.testing.assert_frame_equal(again.genes, result.genes)
    with pytest.raises(ValueError, match="other settings"):
        run(kang_file, bert, tmp_path / "run", mode="overexpress")


def test_batch_size_does_not_change_the_shifts(tmp_path, kang_file, bert) -> None:
    small = run(kang_file, bert, tmp_path / "a", batch_size=2, mode="overexpress")
    large = run(kang_file, bert, tmp_path / "b", batch_size=16, mode="overexpress")
    assert (small.genes["n_cells"] == 30).all()  # overexpression reaches every control cell
    np.testing.assert_allclose(
        small.cells["cell_shift"], large.cells["cell_shift"], rtol=1e-3, atol=1e-6
    )


def test_unknown_gene_and_missing_control_cells_are_clear_errors(tmp_path, kang_file, bert) -> None:
    with pytest.raises(ValueError, match=r"Unknown perturbation gene\(s\) \['NOTAGENE'\]"):
        in_silico_perturbation(kang_file, ["ISG15", "NOTAGENE"], tmp_path / "a", model=bert)
    with pytest.raises(ValueError, match="No source cells"):
        in_silico_perturbation(
            kang_file,
            ["ISG15"],
            tmp_path / "b",
            model=bert,
            target=TargetState("perturbation", "ctrl", "IFN-beta"),
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_perturb_cli(tmp_path, kang_file, bert) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "cellfoundry.cli", "perturb", str(kang_file), str(out)]
    command += ["--genes", "ISG15", "--model", bert, "--mode", "overexpress", "--max-length"]
    command += ["64", "--max-cells", "5", "--target", "perturbation", "control", "IFN-beta"]
    done = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ISG15" in done.stdout
    genes = pd.read_csv(out / "genes.tsv", sep="\t")
    assert genes.loc[0, "n_cells"] == 5
    bad = subprocess.run(
        [*command[:6], "--genes", "NOTAGENE", "--model", bert], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Unknown perturbation gene" in bad.stderr
