"""Plain per-cell implementation of the rank-value scheme: the oracle for tests and benchmarks.

Deliberately simple (one cell at a time: sum genes mapped to one token, normalise in float32,
divide by the median in float64, stable argsort of the negated values) so that anyone can
check it against the documented arithmetic by eye. The fast
paths in ``_rank_kernels`` must equal it for every cell.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def tokenize_cell_reference(
    columns: np.ndarray,
    counts: np.ndarray,
    n_counts: float,
    column_tokens: np.ndarray,
    medians: np.ndarray,
    max_length: int,
    cls_id: int = 2,
) -> np.ndarray:
    """Tokens of one cell: ``[cls] + genes`` by ``(count/n_counts*1e4 [f32]) / median [f64]``.

    ``columns`` and ``counts`` are the cell's stored (column, value) pairs.
    """
    tokens_of_entries = column_tokens[columns]
    mapped = tokens_of_entries >= 0
    tokens, inverse = np.unique(tokens_of_entries[mapped], return_inverse=True)
    summed = np.zeros(tokens.size, dtype=np.float32)  # genes sharing a token: counts summed
    np.add.at(summed, inverse, counts[mapped].astype(np.float32))
    normalised = summed / np.float32(n_counts) * np.float32(10_000)  # float32 arithmetic
    values = normalised.astype(np.float64) / medians[tokens]  # float64 division
    order = np.argsort(-values, kind="stable")
    ranked = tokens[order][: max_length - 1]
    return np.concatenate(([cls_id], ranked)).astype(np.int32)


def tokenize_matrix_reference(
    matrix: sp.csr_matrix,
    n_counts: np.ndarray,
    column_tokens: np.ndarray,
    medians: np.ndarray,
    max_length: int,
    cls_id: int = 2,
) -> list[np.ndarray]:
    """Apply :func:`tokenize_cell_reference` to every row of a CSR matrix."""
    matrix = sp.csr_matrix(matrix)
    cells = []
    for row in range(matrix.shape[0]):
        lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
        cells.append(
            tokenize_cell_reference(
                matrix.indices[lo:hi],
                matrix.data[lo:hi],
                float(n_counts[row]),
                column_tokens,
                medians,
                max_length,
                cls_id,
            )
        )
    return cells
