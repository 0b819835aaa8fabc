"""Apply a fine-tuned task model to new cells and write its output into the AnnData.

Cells go through the same streamed, length-sorted path as zero-shot embedding
(:func:`cellfoundry.embed`, with the fine-tuned encoder and the task's pooling); the head then
runs on the pooled vectors. What is written depends on the task (``Task.write_predictions``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def cell_vectors(
    adata: Any,
    model: Any,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    **tokenize_options: Any,
) -> np.ndarray:
    """(cells, D) pooled vectors of the task model's encoder (NaN rows: cells not tokenized)."""
    from cellfoundry.embedding import embed

    return embed(
        adata,
        model=model.backbone,
        pooling=model.config.pooling,
        batch_size=batch_size,
        max_length=model.config.max_length,
        device=device,
        key_added=None,
        progress=progress,
        **tokenize_options,
    )


@torch.no_grad()
def head_outputs(
    model: Any,
    vectors: np.ndarray,
    batch_size: int = 4096,
    extra: dict[str, np.ndarray] | None = None,
) -> Any:
    """Run the head (eval mode) on the rows of ``vectors`` that are not NaN.

    ``extra`` holds further per-cell head inputs (same rows as ``vectors``), e.g. the niche
    task's neighbour vectors (``Task.head_inputs``).

    Returns the concatenated ``TaskOutput`` fields as numpy arrays (logits, embeddings,
    predictions) for those rows, and the boolean mask of the rows they belong to.
    """
    head = model.head.eval()
    device = next(head.parameters()).device
    valid = ~np.isnan(vectors).any(axis=1)
    fields: dict[str, list[torch.Tensor]] = {"logits": [], "embeddings": [], "predictions": []}
    rows = torch.from_numpy(vectors[valid])
    inputs = {name: torch.from_numpy(values[valid]) for name, values in (extra or {}).items()}
    for start in range(0, len(rows), batch_size):
        part = {k: v[start : start + batch_size].to(device) for k, v in inputs.items()}
        output = head(rows[start : start + batch_size].to(device), **part)
        for name, parts in fields.items():
            if getattr(output, name) is not None:
                parts.append(getattr(output, name).float().cpu())
    return {
        "valid": valid,
        **{name: torch.cat(parts).numpy() if parts else None for name, parts in fields.items()},
    }


def predict(
    adata: Any,
    model: Any,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    score_key: str | None = None,
    **tokenize_options: Any,
) -> dict[str, Any]:
    """Predict with a fine-tuned task model and write the result into ``adata``.

    Parameters
    ----------
    adata : AnnData
        Raw counts (as for ``cellfoundry.embed``).
    model : TaskModel or path
        A task model or the folder it was saved in.
    batch_size, device, progress
        As for ``cellfoundry.embed``.
    score_key : str or None
        ``obs`` column of true labels: the result then also holds ``scores`` (annotation:
        macro-F1 and accuracy; integration: scIB-style metrics). Checked before anything
        runs: a label the annotation model never saw raises ``ValueError`` naming it.
    **tokenize_options
        Passed to the tokenizer (``allow_normalized=True`` for non-count input).

    Returns
    -------
    dict
        What was written (keys and arrays); annotation: ``labels`` (predicted, ``None`` for
        cells that could not be tokenized), ``probabilities`` (cells, K) and ``classes``.
    """
    from cellfoundry.tasks.base import get_task, load_task_model

    if isinstance(model, (str, Path)):
        model = load_task_model(model, device)
    task = get_task(model.config.task)
    if score_key is not None:
        task.check_score_labels(adata, model.config, score_key)
    vectors = cell_vectors(adata, model, batch_size, device, progress, **tokenize_options)
    extra = task.head_inputs(adata, model, batch_size=batch_size, device=device, **tokenize_options)
    outputs = head_outputs(model, vectors, extra=extra)
    written = task.write_predictions(adata, model.config, outputs)
    if score_key is not None:
        written["scores"] = task.score_predictions(adata, model.config, written, score_key)
    return written
