"""UMAP pictures of zero-shot embeddings beside the PCA baseline, for SUMMARY.md.

Pictures, not metrics: the numbers are in the zero-shot and integration tables. One PNG per
dataset with four panels: ours and PCA, each coloured by cell type and by slice (what a
biologist checks first: do types separate, do slices mix).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STARMAP = "spatial_starmap_mpfc_wang2018.h5ad"
CELLS = {"smoke": 300, "quick": 1500, "full": None}  # None: every cell


def shared_data() -> Path:
    """``../shared/data`` beside the repository (where the real datasets live)."""
    return Path(__file__).resolve().parents[4] / "shared" / "data"


def embedding_umaps(folder: Path, model: str | None = None, tier: str = "full") -> Path | None:
    """Write ``umap_starmap.png`` into ``folder``; None (and a message) when data is absent."""
    import anndata as ad

    from cellfoundry.embedding import embed
    from cellfoundry.evaluation.baselines import pca_baseline
    from cellfoundry.plotting import pyplot, save_figure, scatter_by_label, umap_coordinates

    source = shared_data() / STARMAP
    if not source.is_file():
        print(f"UMAP skipped: {source} is not there")
        return None
    adata = ad.read_h5ad(source)
    adata = adata[adata.obs["cell_type"].astype(str) != "NA"].copy()
    n = CELLS[tier]
    if n is not None and adata.n_obs > n:
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, n, replace=False))
        adata = adata[rows].copy()
    name = model or "cellfoundry-tiny-bert"
    ours = embed(adata, name, pooling="mean", key_added=None, progress=False)
    pca, _ = pca_baseline(adata, "counts", n_hvg=2000, n_comps=50, seed=0)
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(13, 10), dpi=100)
    for row, (label, vectors) in enumerate(((f"{name}, mean pooling", ours), ("PCA", pca))):
        coords, finite = umap_coordinates(vectors, seed=0)
        for column, key in enumerate(("cell_type", "batch")):
            values = adata.obs[key].astype(str).to_numpy()[finite]
            scatter_by_label(axes[row, column], coords, values, f"{label}, by {key}")
    figure.suptitle(f"STARmap mPFC, {adata.n_obs} cells: zero-shot embedding vs PCA")
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    return save_figure(figure, folder / "umap_starmap.png")
