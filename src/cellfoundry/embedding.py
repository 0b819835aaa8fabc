"""Zero-shot cell embeddings: AnnData in, one vector per cell out (``adata.obsm``).

Cells are tokenized on the fly with the model's own tokenizer (streamed chunk by chunk, so
memory is bounded by the chunk and batch sizes, not by the number of cells), sorted by length
within each chunk so padding is small, and run through the encoder alone (no masked-gene
logits are ever computed). The order of work depends only on the data, so the same cells
give bit-equal embeddings on rerun with the same device and thread count.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

OBSM_KEY = "X_cellfoundry"


def _load_encoder(model: Any, device: str | None):
    import torch

    from cellfoundry.models import load_model

    encoder = load_model(model, masked_gene_head=False) if isinstance(model, str) else model
    encoder = getattr(encoder, "base_model", encoder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return encoder.to(device).eval(), torch.device(device)


def _tokenizer_for(encoder, tokenizer):
    from cellfoundry.models import check_tokenizer_compatible
    from cellfoundry.tokenization import load_tokenizer

    if tokenizer is None:
        name = encoder.config.tokenizer_id
        if name is None:
            raise ValueError(
                "The model config names no tokenizer_id; pass tokenizer=... explicitly."
            )
        tokenizer = name
    tokenizer = load_tokenizer(tokenizer)
    check_tokenizer_compatible(encoder, tokenizer)
    return tokenizer


def _context_length(encoder, max_length: int | None) -> int:
    """Tokens per cell: ``max_length``, capped at (and by default) the model's context."""
    positions = encoder.config.max_position_embeddings
    return min(max_length or positions, positions)


def _pad_batch(ranked, cells: np.ndarray, context: np.ndarray, pad_id: int):
    import torch

    offsets = ranked.offsets
    lengths = ranked.lengths[cells]
    ids = np.full((cells.size, int(lengths.max())), pad_id, dtype=np.int64)
    for row, cell in enumerate(cells):
        ids[row, : lengths[row]] = ranked.flat_ids[offsets[cell] : offsets[cell + 1]]
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(context.astype(np.int64))


def _length_sorted_batches(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int | None
):
    """Cut cells sorted longest first into batches of <= ``batch_size`` cells and, when set,
    <= ``max_tokens`` padded tokens (the first cell of a batch is its longest)."""
    start = 0
    while start < order.size:
        size = batch_size
        if max_tokens is not None:
            size = max(1, min(batch_size, max_tokens // int(lengths[order[start]])))
        yield order[start : start + size]
        start += size


def embed(
    adata,
    model: Any = "cellfoundry-tiny-bert",
    pooling: str = "cls",
    layer: int = -1,
    batch_size: int = 32,
    max_length: int | None = None,
    max_batch_tokens: int | None = 16_384,
    tokenizer: Any = None,
    counts_layer: str | None = None,
    device: str | None = None,
    key_added: str | None = OBSM_KEY,
    progress: bool = True,
    **tokenize_options: Any,
) -> np.ndarray:
    """Embed every cell of ``adata`` (AnnData or ``.h5ad`` path) with a pretrained encoder.

    Parameters
    ----------
    adata
        AnnData with raw counts (or a path to an ``.h5ad``, read in chunks).
    model
        Shipped name, local folder, Hub id, or a loaded cellfoundry model.
    pooling
        ``"cls"``, ``"mean"`` or ``"max"`` over the gene tokens (see ``pool_hidden_states``).
    layer
        Hidden layer to pool: -1 the last (after the final norm), 0 the embeddings.
    batch_size, max_length
        Cells per forward pass; tokens per cell (default: the model's context length).
    max_batch_tokens
        Also cap a batch at this many padded tokens (cells x longest cell), so batches of
        long cells hold fewer cells and peak memory stays flat across cell lengths;
        ``None`` caps by ``batch_size`` alone.
    tokenizer
        Override the model's tokenizer (must have the same vocabulary; checked).
    counts_layer
        AnnData layer holding raw counts (``None``: ``X``; ``"raw"``: ``raw.X``).
    key_added
        ``adata.obsm`` key to write (AnnData input only); ``None`` writes nothing.
    **tokenize_options
        Passed to :class:`cellfoundry.tokenization.TokenizeOptions` (``allow_normalized``...).

    Returns
    -------
    numpy.ndarray
        (cells, D) float32; rows of cells dropped by tokenization (no counts, no vocabulary
        gene) are NaN and a warning says how many.
    """
    import torch
    from tqdm.auto import tqdm

    from cellfoundry.models._shared import pool_hidden_states
    from cellfoundry.tokenization import TokenizeOptions, TokenizeReport, iter_tokenized

    encoder, device_obj = _load_encoder(model, device)
    tokenizer = _tokenizer_for(encoder, tokenizer)
    limit = _context_length(encoder, max_length)
    options = TokenizeOptions(max_length=limit, layer=counts_layer, **tokenize_options)
    report = TokenizeReport(input=str(adata) if isinstance(adata, str) else "<AnnData>")
    out: np.ndarray | None = None
    bar = tqdm(unit="cells", disable=not progress, desc="embedding")
    with torch.inference_mode():
        for block in iter_tokenized(adata, tokenizer, options, report):
            if out is None:
                out = np.full((report.n_cells_in, encoder.config.hidden_size), np.nan, np.float32)
            order = np.argsort(-block.ranked.lengths, kind="stable")
            for cells in _length_sorted_batches(
                order, block.ranked.lengths, batch_size, max_batch_tokens
            ):
                ids, mask, context = _pad_batch(
                    block.ranked, cells, block.context[cells], tokenizer.vocab.pad_id
                )
                outputs = encoder(
                    ids.to(device_obj),
                    attention_mask=mask.to(device_obj),
                    context_ids=context.to(device_obj),
                    output_hidden_states=layer != -1,
                )
                hidden = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
                pooled = pool_hidden_states(hidden, mask.to(device_obj), pooling)
                out[block.rows[cells]] = pooled.float().cpu().numpy()
                bar.update(cells.size)
    bar.close()
    dropped = report.n_empty_dropped + report.n_no_vocab_gene_dropped
    if dropped:
        logger.warning("%d cells had no counts or no vocabulary gene: their rows are NaN.", dropped)
    if key_added and not isinstance(adata, str) and hasattr(adata, "obsm"):
        adata.obsm[key_added] = out
    return out
