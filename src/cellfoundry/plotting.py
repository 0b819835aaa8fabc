"""UMAP pictures of embeddings, for a person to look at (not a metric)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_COLOR_COLUMNS = ("cell_type", "region", "batch", "donor", "tissue")


def pick_color_column(obs, requested: str | None = None) -> str | None:
    """The obs column to colour by: the requested one (must exist) or a usual label column."""
    if requested is not None:
        if requested not in obs.columns:
            raise ValueError(
                f"--color column {requested!r} is not in obs; obs has {list(obs.columns)[:20]}."
            )
        return requested
    return next((c for c in DEFAULT_COLOR_COLUMNS if c in obs.columns), None)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, with a clear error when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError(
            f"Plots need matplotlib ({error}); pip install 'cellfoundry[plot]'."
        ) from error
    return plt


def umap_coordinates(embedding: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D UMAP of the finite rows of ``embedding``; returns (coordinates, finite mask)."""
    try:
        import umap
    except ImportError as error:
        raise ValueError(
            f"UMAP pictures need umap-learn ({error}); pip install 'cellfoundry[plot]'."
        ) from error
    finite = np.isfinite(embedding).all(axis=1)
    return umap.UMAP(random_state=seed, n_neighbors=15).fit_transform(embedding[finite]), finite


def scatter_by_label(axis, coords: np.ndarray, labels, title: str, legend: bool = True) -> None:
    """One UMAP panel: points coloured by ``labels`` (or plain when None)."""
    if labels is None:
        axis.scatter(coords[:, 0], coords[:, 1], s=4, alpha=0.7)
    else:
        values = np.asarray(labels).astype(str)
        names = sorted(set(values))
        # the default cycle repeats after 10 colours: two types would look like one
        palette = pyplot().get_cmap("tab10" if len(names) <= 10 else "tab20")
        for index, value in enumerate(names):
            chosen = values == value
            colour = palette(index % palette.N)
            axis.scatter(
                coords[chosen, 0], coords[chosen, 1], s=4, alpha=0.7, label=value, color=colour
            )
        if legend:
            axis.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axis.set(title=title, xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])


def save_figure(figure, path: str | Path) -> Path:
    """Save ``figure`` as a PNG atomically (never a half-written file) and close it."""
    plt = pyplot()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent or ".")
    os.close(fd)
    try:
        figure.savefig(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def umap_plot(embedding: np.ndarray, labels, path: str | Path, title: str, seed: int = 0) -> Path:
    """Write a 2-D UMAP scatter of ``embedding`` (cells, D) coloured by ``labels`` to a PNG.

    Requires ``umap-learn`` and ``matplotlib`` (``pip install "cellfoundry[plot]"``).
    """
    plt = pyplot()
    coords, finite = umap_coordinates(embedding, seed)
    figure, axis = plt.subplots(figsize=(7, 6), dpi=120)
    chosen = None if labels is None else np.asarray(labels)[finite]
    scatter_by_label(axis, coords, chosen, title)
    figure.tight_layout()
    return save_figure(figure, path)
