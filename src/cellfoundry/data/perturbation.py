"""Groups and splits for perturbation-response prediction (the scGen setting).

Kang's IFN-beta PBMC file has no cell types, so groups are derived: clusters that hold control
and stimulated cells alike. Clustering control and stimulated cells together on plain PCA
would split them by condition (IFN-beta moves hundreds of genes), so the condition is treated
as a batch and removed first, as Seurat's ifnb vignette does before clustering:
log-normalise -> HVGs of the control cells -> PCA -> Harmony (condition as batch) -> KMeans on
the control cells -> each perturbed cell joins the cluster of its nearest control cells.
A group split then holds out one group's perturbed cells: training sees every other group in
both conditions and the held-out group's control cells only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry._io import atomic_write_text


def _conditions(obs: Any, condition_key: str, control_value: str) -> np.ndarray:
    """Boolean control mask, with clear errors for a missing column or no control cells."""
    if condition_key not in obs.columns:
        raise ValueError(
            f"No obs column {condition_key!r} naming each cell's condition (columns: "
            f"{list(obs.columns)})."
        )
    values = obs[condition_key].astype(str).to_numpy()
    control = values == control_value
    if not control.any():
        raise ValueError(
            f"No control cells: obs[{condition_key!r}] has no {control_value!r} (values: "
            f"{sorted(set(values))[:10]}); name the control condition as written."
        )
    if control.all():
        raise ValueError(f"Every cell is {control_value!r}: there is no perturbed cell to learn.")
    return control


def condition_clusters(
    adata: Any,
    condition_key: str,
    control_value: str,
    n_clusters: int = 8,
    n_hvg: int = 2000,
    n_comps: int = 30,
    seed: int = 0,
) -> np.ndarray:
    """Cluster labels (``"c0"``...) shared by control and perturbed cells (raw counts in ``X``).

    HVGs come from the control cells only, so the response genes do not drive the space.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    from cellfoundry.evaluation.baselines import harmony_embedding, log_normalize, seurat_hvg

    control = _conditions(adata.obs, condition_key, control_value)
    logged = log_normalize(adata.X, str(adata.uns.get("x_kind", "counts")))
    genes = seurat_hvg(logged[control], n_hvg)
    matrix = logged[:, genes]
    matrix = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    scores = PCA(n_components=n_comps, random_state=seed).fit_transform(matrix)
    corrected = harmony_embedding(scores, adata.obs[condition_key].astype(str), seed=seed)
    codes = np.empty(len(corrected), dtype=np.int64)
    kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    codes[control] = kmeans.fit_predict(corrected[control])
    # Perturbed cells take the cluster of their nearest control cells (k = 15, majority):
    # clustering both conditions at once left condition-only clusters even after Harmony
    # (on 1,500 Kang cells: two of five clusters were 99% one condition).
    neighbours = KNeighborsClassifier(n_neighbors=min(15, int(control.sum())))
    codes[~control] = neighbours.fit(corrected[control], codes[control]).predict(
        corrected[~control]
    )
    return np.array([f"c{code}" for code in codes])


@dataclass(frozen=True)
class GroupSplit:
    """Row positions of one held-out-group split (saved as JSON beside its results)."""

    heldout_group: str
    train_control: list[int]
    train_perturbed: list[int]
    heldout_control: list[int]
    heldout_perturbed: list[int]

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GroupSplit:
        return cls(**json.loads(Path(path).read_text()))


def heldout_group_split(
    obs: Any, group_key: str, condition_key: str, control_value: str, heldout_group: str
) -> GroupSplit:
    """Hold out ``heldout_group``'s perturbed cells; everything else is training."""
    control = _conditions(obs, condition_key, control_value)
    groups = obs[group_key].astype(str).to_numpy()
    held = groups == str(heldout_group)
    if not (held & control).any() or not (held & ~control).any():
        raise ValueError(
            f"Group {heldout_group!r} needs control and perturbed cells to be held out; it has "
            f"{int((held & control).sum())} control and {int((held & ~control).sum())} perturbed."
        )
    rows = np.arange(len(obs))
    return GroupSplit(
        heldout_group=str(heldout_group),
        train_control=rows[~held & control].tolist(),
        train_perturbed=rows[~held & ~control].tolist(),
        heldout_control=rows[held & control].tolist(),
        heldout_perturbed=rows[held & ~control].tolist(),
    )
