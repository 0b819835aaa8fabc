"""Offline gene-id resolution (cellfoundry.genes): rules, column detection, report, shipped maps."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellfoundry.genes import (
    GeneResolution,
    build_gene_maps,
    detect_species,
    load_gene_maps,
    resolve_genes,
)

# Defined here rather than imported from conftest.py, which other test modules own.
SHARED_DATA = Path(
    os.environ.get(
        "CELLFOUNDRY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "cellfoundry" / "_data" / "genes"

TP53, BRCA1, BRCA2, ACTB = (
    "ENSG00000141510",
    "ENSG00000012048",
    "ENSG00000139618",
    "ENSG00000075624",
)


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not present (CI and developer machines have ../shared)")
    return path


def _var(names, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(names, dtype=object))


def _real_var(name: str) -> pd.DataFrame:
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(_shared(name), backed="r")
    var = adata.var.copy()
    adata.file.close()
    return var


def _human_id(symbol: str) -> str:
    return str(load_gene_maps().symbol_to_id[symbol.upper()])


# -- human ids and symbols ----------------------------------------------------------------


def test_ensembl_ids_with_and_without_version():
    var = _var(
        [
            f"{TP53}.17",
            BRCA1,
            f"{BRCA2.lower()}.5",
            "ENSG00000182378.14_PAR_Y",
            "ENSG00000182378",
            "ENSG00000000001",  # well-formed but not in GENCODE v44
        ]
    )
    res = resolve_genes(var, species="human")
    assert list(res.ensembl_ids) == [TP53, BRCA1, BRCA2, "ENSG00000182378", "ENSG00000182378", ""]
    assert (res.source, res.id_kind, res.species) == ("var_names", "ensembl", "human")
    assert (res.n_input, res.n_mapped, res.n_unmapped, res.n_collapsed) == (6, 5, 1, 1)
    assert res.unmapped_examples == ["ENSG00000000001"]
    assert res.collapsed_examples == [("ENSG00000182378", "ENSG00000182378")]


def test_symbols_are_case_insensitive():
    res = resolve_genes(_var(["TP53", "brca1", "Brca2", "aCtB", "NOT_A_GENE"]), species="human")
    assert list(res.ensembl_ids) == [TP53, BRCA1, BRCA2, ACTB, ""]
    assert res.id_kind == "symbol" and res.n_mapped == 4 and res.n_collapsed == 0


def test_duplicate_symbol_resolves_to_smallest_id():
    maps = load_gene_maps()
    for symbol in ("5S_rRNA", "MATR3", "ASMT", "7SK"):
        ids = maps.id_to_symbol.index[maps.id_to_symbol.str.upper() == symbol.upper()]
        assert len(ids) > 1, symbol
        res = resolve_genes(_var([symbol.lower()]), species="human")
        assert res.ensembl_ids[0] == min(ids), symbol
    assert _human_id("MATR3") == "ENSG00000015479"  # protein-coding, not ENSG00000280987
    assert _human_id("ASMT") == "ENSG00000196433"  # not v44's PAR_Y id ENSG00000292336


def test_duplicate_symbols_in_input_are_collapsed():
    var = _var(["TP53", "tp53", "MATR3", "MATR3-1", "RP11-206L10.2", "HLA-A"])
    res = resolve_genes(var, species="human")
    assert res.ensembl_ids[1] == res.ensembl_ids[0] == TP53
    assert res.ensembl_ids[3] == res.ensembl_ids[2] == "ENSG00000015479"  # make_unique suffix
    assert res.ensembl_ids[4] == ""  # old clone name: no alias table, counted unmapped
    assert res.ensembl_ids[5] != ""
    assert res.n_collapsed == 2 and res.n_unique_ids == 3
    assert res.collapsed_examples == [("tp53", TP53), ("MATR3-1", "ENSG00000015479")]


def test_symbols_of_and_cache():
    maps = load_gene_maps()
    assert load_gene_maps() is maps
    ids = [TP53, "ENSG00000290826", "ENSG00000000001"]  # the 2nd has no symbol in v44
    assert list(maps.symbols_of(ids)) == ["TP53", "ENSG00000290826", ""]


# -- mouse --------------------------------------------------------------------------------


def test_mouse_one_to_one_and_lower_case():
    res = resolve_genes(_var(["Actb", "gapdh", "Trp53"]), species="mouse")
    assert list(res.ensembl_ids) == [ACTB, _human_id("GAPDH"), TP53]
    assert (res.species, res.id_kind, res.n_mapped) == ("mouse", "symbol", 3)


def test_mouse_one_to_many_rule():
    maps = load_gene_maps()
    assert maps.mouse.loc["ACOT1", "candidates"] == "ACOT1|ACOT2"
    assert maps.mouse.loc["ADH1", "rule"] == "ambiguous"
    res = resolve_genes(_var(["Acot1", "Adh1", "Actb"]), species="mouse")
    assert res.ensembl_ids[0] == _human_id("ACOT1")  # same-symbol candidate wins
    assert res.ensembl_ids[1] == ""  # ADH1A|ADH1B|ADH1C, none named ADH1: ambiguous
    assert (res.n_mapped, res.n_unmapped, res.n_ambiguous) == (2, 1, 1)
    assert res.ambiguous_examples == [("Adh1", "ADH1A|ADH1B|ADH1C")]
    assert "ADH1A|ADH1B|ADH1C" in res.summary()


def test_mouse_many_to_one_is_collapsed():
    res = resolve_genes(_var(["Ugt1a6a", "Ugt1a6b", "Actb"]), species="mouse")
    assert res.ensembl_ids[0] == res.ensembl_ids[1] == _human_id("UGT1A6")
    assert res.n_collapsed == 1 and res.collapsed_examples == [("Ugt1a6b", _human_id("UGT1A6"))]


def test_mouse_symbol_fallback_and_mouse_ensembl_ids():
    assert "PTMA" not in load_gene_maps().mouse.index  # missing from the Ensembl 105 table
    res = resolve_genes(_var(["Ptma", "pcp4", "ENSMUSG00000029580", "Gm1992"]), species="mouse")
    assert list(res.ensembl_ids) == [_human_id("PTMA"), _human_id("PCP4"), "", ""]
    assert res.n_symbol_fallback == 2 and res.n_unmapped == 2


def test_mouse_prefers_symbols_over_mouse_ensembl_ids():
    var = _var(["acss1", "arc", "aqp4"], ensembl_id=["ENSMUSG00000027452", "", "x"])
    res = resolve_genes(var)
    assert (res.species, res.source, res.n_mapped) == ("mouse", "var_names", 3)
    assert res.candidate_scores == {"var_names": 3, "ensembl_id": 0}


# -- species and column detection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "species"),
    [
        ([TP53, f"{BRCA1}.3", "junk"], "human"),
        (["ENSMUSG00000029580", "ENSMUSG00000027452"], "mouse"),
        (["ACTB", "GAPDH", "C1orf112", "AAACCTGAGAAGGCCT-1"], "human"),
        (["Actb", "Gapdh", "mt-Nd1", "XIST"], "mouse"),
        (["actb", "gapdh", "acss1"], "mouse"),
        (["AAACCTGAGAAGGCCT-1", "cell_2"], "human"),  # no evidence: the vocabulary's species
    ],
)
def test_detect_species(ids, species):
    assert detect_species(ids) == species


def test_detects_id_column_when_var_names_are_junk():
    barcodes = [f"AAACCTGAGAAGG{i:03d}-1" for i in range(4)]
    var = _var(barcodes, ensembl_id=[TP53, BRCA1, f"{ACTB}.9", ""], n_cells=[1, 2, 3, 4])
    res = resolve_genes(var)
    assert (res.source, res.id_kind, res.species) == ("ensembl_id", "ensembl", "human")
    assert list(res.ensembl_ids) == [TP53, BRCA1, ACTB, ""]
    assert res.unmapped_examples == ["AAACCTGAGAAGG003-1 (no id)"]
    assert "n_cells" not in res.candidate_scores  # numeric columns are never candidates


def test_detects_var_names_when_column_is_junk():
    var = _var([TP53, BRCA1, ACTB], feature_types=["Gene Expression"] * 3, genome=["GRCh38"] * 3)
    res = resolve_genes(var)
    assert (res.source, res.n_mapped) == ("var_names", 3)


def test_symbols_and_ids_tie_prefers_ids_and_gene_column_forces():
    var = _var(["TP53", "BRCA1"], gene_ids=[TP53, BRCA1], category=pd.Categorical(["a", "b"]))
    assert resolve_genes(var).source == "gene_ids"
    assert resolve_genes(var, gene_column="var_names").source == "var_names"
    with pytest.raises(ValueError, match="gene_column='nope'.*gene_ids"):
        resolve_genes(var, gene_column="nope")


def test_nothing_maps_raises_with_examples():
    var = _var(["cell_1", "cell_2", "cell_3"], other=["x1", "x2", "x3"])
    with pytest.raises(ValueError) as info:
        resolve_genes(var)
    message = str(info.value)
    assert "cell_1" in message and "x1" in message
    assert "Ensembl" in message and "symbols" in message and "gene_column" in message


def test_mouse_ensembl_ids_only_raise():
    with pytest.raises(ValueError, match="ENSMUSG00000029580.*ENSMUSG"):
        resolve_genes(_var(["ENSMUSG00000029580", "ENSMUSG00000027452"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="species"):
        resolve_genes(_var(["TP53"]), species="rat")
    with pytest.raises(TypeError, match="adata.var"):
        resolve_genes(["TP53"])


# -- report ---------------------------------------------------------------------------------


def test_report_is_logged_not_printed(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="cellfoundry.genes"):
        res = resolve_genes(_var(["TP53", "tp53", "junk"]), species="human")
    assert isinstance(res, GeneResolution)
    assert res.summary() in caplog.text and "2 mapped" in res.summary()
    assert capsys.readouterr().out == ""
    report = json.loads(json.dumps(res.to_dict()))
    assert report["n_collapsed"] == 1 and report["unmapped_examples"] == ["junk"]
    assert report["n_mapped"] + report["n_unmapped"] == report["n_input"] == 3


@pytest.mark.parametrize(
    ("name", "species", "source", "min_mapped", "max_collapsed"),
    [
        # measured: 19,391 / 32,786 mapped, 13,395 unmapped (old RP11-... names), 2 collapsed
        ("corpus_celltypist_sample.h5ad", "human", "var_names", 19_000, 10),
        # measured: 11,790 / 14,053 mapped, 2,263 unmapped, 4 collapsed (CRYBG3.1 etc.)
        ("pert_kang2018_ifnb_pbmc.h5ad", "human", "var_names", 11_500, 10),
        # measured: 154 / 158 mapped (1 by identical symbol: pcp4), 4 unmapped, 0 collapsed
        ("spatial_starmap_mpfc_wang2018.h5ad", "mouse", "var_names", 150, 0),
    ],
)
def test_report_on_real_data(name, species, source, min_mapped, max_collapsed):
    res = resolve_genes(_real_var(name))
    assert (res.species, res.source, res.id_kind) == (species, source, "symbol")
    assert res.n_mapped >= min_mapped and res.n_collapsed <= max_collapsed
    assert res.n_mapped + res.n_unmapped == res.n_input == len(res.ensembl_ids)
    assert res.n_unique_ids == len(set(res.ensembl_ids[res.ensembl_ids != ""]))
    assert all(i == "" or (i.startswith("ENSG") and len(i) == 15) for i in res.ensembl_ids)


def test_kang_old_symbols_are_reported():
    var = _real_var("pert_kang2018_ifnb_pbmc.h5ad")
    res = resolve_genes(var)
    assert "RP11-206L10.2" in res.unmapped_examples
    assert res.ensembl_ids[var.index.get_loc("RP11-206L10.2")] == ""
    made_unique = np.flatnonzero(var.index == "CRYBG3.1")
    assert res.ensembl_ids[made_unique[0]] == res.ensembl_ids[var.index.get_loc("CRYBG3")]


# -- shipped maps -----------------------------------------------------------------------------


def test_shipped_maps_match_provenance():
    provenance = load_gene_maps().provenance
    assert set(provenance["rules"]) >= {"duplicate_symbols", "mouse_one_to_many"}
    assert provenance["statistics"]["symbols_with_several_ids"] == 343
    for name, meta in provenance["outputs"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == meta["sha256"]


def test_build_is_deterministic_and_equals_shipped(tmp_path):
    source = _shared("genes")
    first = build_gene_maps(source, tmp_path / "a")
    second = build_gene_maps(source, tmp_path / "b")
    assert first == second
    names = sorted(p.name for p in SHIPPED.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "a").iterdir())
    for name in names:
        built = (tmp_path / "a" / name).read_bytes()
        assert built == (tmp_path / "b" / name).read_bytes(), name
        assert built == (SHIPPED / name).read_bytes(), f"{name}: rebuild with the build_command"
    assert [s["rows"] for s in first["sources"]] == [62_754, 24_857]


def test_import_does_not_pull_torch():
    code = (
        "import sys, cellfoundry.genes; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
