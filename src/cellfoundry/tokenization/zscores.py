"""Tokenizing z-scored (non-count) data, e.g. the released seqFISH cortex matrix.

Rank-value tokens order a cell's genes by how far each is above its typical level. Z-scores
already say that (a gene's value relative to its own mean, in its own standard deviations), but
they are negative for half the cells and the tokenizer refuses negative values. ``exp(z)`` is the
transform that keeps the meaning: it is positive, strictly increasing, so the order of a cell's
genes by ``exp(z)`` is their order by ``z``; the per-cell normalisation divides a cell by one
number and changes no order; every measured gene counts as detected (z carries no zeros). The
tokenizer's division by its corpus medians still applies, as for any normalised input
(``allow_normalized=True``). A shift to ``z - min(z)`` was the alternative: it makes one cell
per gene "undetected" and lets a single outlier cell move the whole gene's scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

X_KIND = "exp(z-score)"  # uns["x_kind"] of the result: baselines take log() to get z back
Z_CLIP = 20.0  # exp(20) ~ 5e8: larger |z| are outliers, not signal, and would overflow float32


def positive_from_zscores(adata: Any, clip: float = Z_CLIP) -> Any:
    """A copy of ``adata`` whose ``X`` is ``exp(clip(z))``: positive values to tokenize with
    ``allow_normalized=True``. Raises on NaN/inf, which no transform should hide."""
    matrix = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    if not np.isfinite(matrix).all():
        raise ValueError(
            "The z-scores hold NaN or infinite values; drop or impute them before tokenizing."
        )
    out = adata.copy()
    out.X = np.exp(np.clip(matrix, -clip, clip)).astype(np.float32)
    out.uns["x_kind"] = X_KIND
    return out
