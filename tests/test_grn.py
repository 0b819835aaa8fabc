"""GRN: BEELINE metrics on hand-computed rankings, gold-standard restriction, and each
inference method on real Kang cells (tiny model), with clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file

from cellfoundry.evaluation.grn import (
    early_precision,
    gold_standard,
    grn_scores,
    score_ranking,
    tf_bootstrap_differences,
)
from cellfoundry.grn import GeneUniverse, gene_universe, infer_edges, write_edges

GENES = ["A", "B", "C", "D"]
GOLD_EDGES = pd.DataFrame({"tf": ["A", "B", "A", "X"], "target": ["B", "C", "A", "C"]})


def edges(pairs: dict[str, float]) -> pd.DataFrame:
    rows = [(*key.split(">"), value) for key, value in pairs.items()]
    return pd.DataFrame(rows, columns=["tf", "target", "score"])


@pytest.fixture
def gold():
    # A->A is a self-loop and X is not measured: both dropped; candidates A->{B,C,D}, B->{A,C,D}.
    return gold_standard(GOLD_EDGES, GENES, ["A", "B", "X"], "toy")


def test_gold_standard_keeps_measured_listed_regulators_without_self_loops(gold) -> None:
    assert gold.tfs == ("A", "B")
    assert gold.edges == frozenset({("A", "B"), ("B", "C")})
    assert gold.n_possible == 6 and gold.density == pytest.approx(1 / 3)
    assert gold.restrict_tfs(["b"]).edges == frozenset({("B", "C")})


def test_scores_match_hand_computed_values(gold) -> None:
    # Ranking T(0.9) F(0.8) T(0.7) F(0.3) F(0.2) F(0.1): top-2 holds one true edge.
    table = edges({"A>B": 0.9, "A>C": 0.8, "B>C": 0.7, "B>D": 0.3, "B>A": 0.2, "A>D": 0.1})
    scores = grn_scores(table, gold)
    assert scores.early_precision == pytest.approx(0.5)
    assert scores.epr == pytest.approx(0.5 / (1 / 3))
    assert scores.auroc == pytest.approx(7 / 8)  # 0.7 loses only to the false 0.8
    assert scores.auprc == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert scores.auprc_ratio == pytest.approx((0.5 + 1 / 3) * 3)
    perfect = grn_scores(edges({"A>B": 2.0, "B>C": 1.0, "A>C": 0.5}), gold)
    assert perfect.epr == pytest.approx(3.0) and perfect.auroc == pytest.approx(1.0)
    assert perfect.n_scored == 3


def test_early_precision_keeps_ties_and_ignores_unscored_edges() -> None:
    truth = np.array([True, False, True, False])
    # Three edges tie at the 2nd-highest score: all three count, two are true.
    assert early_precision(np.array([0.5, 0.5, 0.5, 0.1]), truth) == pytest.approx(2 / 3)
    # One scored edge (false): the unscored (NaN) ones never count as predictions.
    assert early_precision(np.array([np.nan, 0.9, np.nan, np.nan]), truth) == 0.0
    unscored = score_ranking(np.full(4, np.nan), truth, 1)
    assert unscored.epr == 0.0 and unscored.auroc == pytest.approx(0.5)


def test_paired_tf_bootstrap(gold) -> None:
    good = edges({"A>B": 0.9, "B>C": 0.8, "A>C": 0.1, "A>D": 0.1, "B>A": 0.1, "B>D": 0.1})
    bad = edges({"A>B": 0.1, "B>C": 0.1, "A>C": 0.9, "A>D": 0.8, "B>A": 0.7, "B>D": 0.6})
    same = tf_bootstrap_differences(good, [good, good], gold, n_boot=50)["auroc"]
    assert same["difference"] == 0.0 and same["verdict"] == "no difference"
    better = tf_bootstrap_differences(good, bad, gold, n_boot=50)
    assert better["auroc"]["difference"] == pytest.approx(1.0)
    assert better["auroc"]["verdict"] == better["epr"]["verdict"] == "better"


def test_numpy_metrics_equal_scikit_learn_with_ties() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.05
    score = np.round(rng.random(5000) + truth * 0.3, 2)  # many ties
    scores = score_ranking(score, truth, 1)
    assert scores.auroc == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
    assert scores.auprc == pytest.approx(average_precision_score(truth, score), abs=1e-12)


def test_no_overlapping_tf_list_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="No regulator left.*same species"):
        gold_standard(GOLD_EDGES, GENES, ["Pou5f1", "Sox2"])


def test_edge_table_drops_self_loops_and_writes_atomically(tmp_path) -> None:
    universe = GeneUniverse(np.arange(3), ("A", "B", "C"), ("A", "C"))
    table = universe.edge_table(np.array([[9.0, 1.0, np.nan], [2.0, 3.0, 9.0]]))
    assert list(zip(table["tf"], table["target"], strict=True)) == [
        ("C", "B"),
        ("C", "A"),
        ("A", "B"),
    ]
    path = write_edges(table, tmp_path / "edges.tsv")
    written = pd.read_csv(path, sep="\t")
    assert written["rank"].tolist() == [1, 2, 3] and not list(tmp_path.glob("*.tmp*"))


# -- methods on real cells ---------------------------------------------------------------------
TFS = ["STAT1", "IRF7", "IRF1", "SPI1", "CEBPB", "JUNB", "FOS", "KLF6", "ATF3", "REL"]


@pytest.fixture(scope="module")
def kang():
    """200 Kang PBMCs (raw counts) and a 300-gene universe with their TFs."""
    adata = ad.read_h5ad(shared_file("pert_kang2018_ifnb_pbmc.h5ad"))
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 200, replace=False))
    adata = adata[rows].copy()
    return adata, gene_universe(adata, TFS, n_genes=300, tf_pool=3000)


def test_universe_adds_variable_tfs_and_refuses_a_foreign_tf_list(kang) -> None:
    adata, universe = kang
    assert 300 <= len(universe.genes) <= 300 + len(TFS)
    assert set(universe.tfs) <= set(TFS) and len(universe.tfs) >= 3
    symbols = adata.var_names.str.upper()[universe.columns]
    assert tuple(symbols) == universe.genes
    with pytest.raises(ValueError, match="None of the 2 listed TFs"):
        gene_universe(adata, ["Stat1x", "Irf7x"])


def test_correlation_matches_numpy(kang) -> None:
    from cellfoundry.grn.edges import universe_expression

    adata, universe = kang
    table = infer_edges(adata, universe, "pearson")
    x = universe_expression(adata, universe)
    tf, target = table["tf"].iloc[0], table["target"].iloc[0]
    i, j = universe.genes.index(tf), universe.genes.index(target)
    assert table["score"].iloc[0] == pytest.approx(abs(np.corrcoef(x[:, i], x[:, j])[0, 1]))
    assert len(table) == len(universe.tfs) * (len(universe.genes) - 1)


def test_attention_scores_equal_the_eager_attention_weights(kang, base_models, monkeypatch):
    """The probabilities recomputed from query/key hooks are the ones eager attention uses."""
    import torch

    from cellfoundry.grn.model_scores import _attention_probabilities, _batches
    from cellfoundry.models import load_model
    from cellfoundry.models.cellbert import modeling_cellbert
    from cellfoundry.tokenization import load_tokenizer

    adata, universe = kang
    encoder = load_model(base_models["bert"], attn_implementation="eager").eval()
    recorded = []
    original = modeling_cellbert.eager_attention_forward

    def recording(*args, **kwargs):
        output, weights = original(*args, **kwargs)
        recorded.append(weights.mean(dim=1))
        return output, weights

    monkeypatch.setattr(modeling_cellbert, "eager_attention_forward", recording)
    captured = {}
    for index, layer in enumerate(encoder.layers):
        for name in ("query", "key"):
            getattr(layer.attention, name).register_forward_hook(
                lambda _m, _i, out, key=(index, name): captured.__setitem__(key, out)
            )
    tokenizer = load_tokenizer(encoder.config.tokenizer_id)
    ids, mask, context = next(_batches(adata, encoder, tokenizer, np.arange(8), 8, 64, {}))
    mask[0, 20:], mask[3, 41:] = 0, 0  # shorter cells: the batch has padding
    ids[mask == 0] = tokenizer.vocab.pad_id
    with torch.inference_mode():
        encoder(ids, attention_mask=mask, context_ids=context)
        ours = _attention_probabilities(encoder.layers, captured, mask)
    expected = torch.stack(recorded).mean(dim=0)
    real = mask.bool()[:, :, None] & mask.bool()[:, None, :]
    torch.testing.assert_close(ours[real], expected[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(-1)[mask.bool()], torch.ones(int(mask.sum())))


def test_model_methods_run_on_both_backbones(kang, base_models, tmp_path) -> None:
    adata, universe = kang
    options = {"max_cells": 40, "batch_size": 8, "max_length": 64}
    attention = infer_edges(adata, universe, "attention", model=base_models["bert"], **options)
    # batch size changes padding, never the scores
    again = infer_edges(
        adata, universe, "attention", model=base_models["bert"], **{**options, "batch_size": 3}
    )
    merged = attention.merge(again, on=["tf", "target"])
    np.testing.assert_allclose(merged["score_x"], merged["score_y"], rtol=1e-4, atol=1e-7)
    assert len(attention) > 0 and attention["score"].between(0, 1).all()
    for backbone in ("bert", "mamba"):
        similarity = infer_edges(
            adata, universe, "embedding", model=base_models[backbone], **options
        )
        assert similarity["score"].between(-1 - 1e-9, 1 + 1e-9).all() and len(similarity) > 0
    deletion = infer_edges(
        adata,
        universe,
        "deletion",
        model=base_models["mamba"],
        output_dir=tmp_path / "deletion",
        **{**options, "max_cells": 10},
    )
    assert (deletion["score"] >= -1e-6).all()  # 1 - cos, up to float rounding
    assert (tmp_path / "deletion" / "affected.tsv").is_file()
    with pytest.raises(ValueError, match="needs an attention backbone"):
        infer_edges(adata, universe, "attention", model=base_models["mamba"], **options)


def test_genie3_finds_a_planted_regulator() -> None:
    """A target built from one TF's values: GENIE3 ranks that TF first for it."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(300, 6)).astype(np.float32)
    counts[:, 5] = counts[:, 0] * 3 + rng.poisson(0.5, 300)
    adata = ad.AnnData(counts)
    adata.var_names = ["T0", "T1", "T2", "G3", "G4", "G5"]
    universe = GeneUniverse(np.arange(6), tuple(adata.var_names), ("T0", "T1", "T2"))
    table = infer_edges(adata, universe, "genie3", n_trees=20, n_jobs=1)
    assert table[table["target"] == "G5"].iloc[0]["tf"] == "T0"


def test_cli_writes_the_edge_table_and_scores_it(tmp_path, kang) -> None:
    adata, _ = kang
    data, tfs = tmp_path / "kang.h5ad", tmp_path / "tfs.txt"
    gold = shared_file("grn/dorothea_human_AtoD.csv")
    adata.write_h5ad(data)
    tfs.write_text("\n".join(TFS) + "\n")
    out = tmp_path / "edges.tsv"
    command = [sys.executable, "-m", "cellfoundry.cli", "grn", str(data), str(out)]
    command += ["--method", "spearman", "--tfs", str(tfs), "--n-genes", "300", "--gold", str(gold)]
    command += ["--confidence", "ABC"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "EPR" in done.stdout and out.is_file()
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == ["tf", "target", "score", "rank"]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr


# -- the supervised pair classifier (grn task) --------------------------------------------------
@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_pair_classifier_trains_on_some_tfs_and_scores_held_out_ones(
    tmp_path, kang, base_models, backbone
) -> None:
    import json

    import torch

    from cellfoundry.tasks import GRNConfig, load_task_model, pair_classifier_edges, run_finetuning
    from cellfoundry.training import FinetuningArgs

    adata, _ = kang
    data = tmp_path / "kang.h5ad"
    adata.write_h5ad(data)
    config = GRNConfig(
        base_model=base_models[backbone],
        gold=str(shared_file("grn/dorothea_human_AtoD.csv")),
        tf_list=str(shared_file("grn/tfs_human_lambert2018.txt")),
        n_genes=300,
        genie3_baseline=False,
    )
    args = FinetuningArgs(
        data=str(data),
        output_dir=str(tmp_path / "run"),
        label_key="batch",
        split_strategy="random",
        batch_size=8,
        max_steps=3,
        eval_every=3,
        log_every=1,
        progress_bar=False,
        learning_rate=1e-3,
    )
    result = run_finetuning(config, args)
    metrics = json.loads((result.output_dir / "test_metrics.json").read_text())
    assert set(metrics["baselines"]) == {
        "Pearson",
        "Spearman",
        "random",
        "target degree (training edges)",
    }
    assert not set(metrics["heldout_tfs"]) & set(config.train_tfs)
    assert all(t in config.genes for t in metrics["heldout_tfs"])
    edges_of_train = {tf for tf, _ in config.train_edges}
    assert edges_of_train <= set(config.train_tfs) and edges_of_train
    for comparison in metrics["comparison"].values():
        low, high = comparison["ci95"]
        assert low <= comparison["difference"] + 1e-9 or np.isnan(low)
        assert low <= high
    # the head's labels are exactly the training TFs' gold edges
    model = load_task_model(result.output_dir)
    assert int((model.head.labels == 1).sum()) == len(config.train_edges)
    edges = pair_classifier_edges(model, adata, max_cells=20)
    assert set(edges["tf"]) <= set(metrics["heldout_tfs"]) and len(edges) > 0
    again = pair_classifier_edges(model, adata, max_cells=20, batch_size=3)
    merged = edges.merge(again, on=["tf", "target"])
    torch.testing.assert_close(
        torch.tensor(merged["score_x"].to_numpy()),
        torch.tensor(merged["score_y"].to_numpy()),
        rtol=1e-4,
        atol=1e-5,
    )


def test_grn_task_names_missing_gold_files(tmp_path, kang, base_models) -> None:
    from cellfoundry.tasks import GRNConfig, run_finetuning
    from cellfoundry.training import FinetuningArgs

    adata, _ = kang
    data = tmp_path / "kang.h5ad"
    adata.write_h5ad(data)
    config = GRNConfig(base_model=base_models["bert"], gold="missing.csv", tf_list="")
    args = FinetuningArgs(
        data=str(data), output_dir=str(tmp_path / "run"), label_key="batch", max_steps=1
    )
    with pytest.raises(ValueError, match="task.gold='missing.csv' is not a file"):
        run_finetuning(config, args)
