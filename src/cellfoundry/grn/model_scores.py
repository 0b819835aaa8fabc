"""Gene-gene scores read from the pretrained encoder, over a :class:`GeneUniverse`.

- ``attention``: the attention one gene's token pays another's, averaged over heads and
  layers, then over the cells whose tokens hold both genes; symmetrised (the model's attention
  has no regulatory direction we could trust). Attention probabilities are recomputed from
  each layer's ``query``/``key`` outputs (caught by forward hooks), so any attention backend
  works and nothing larger than one batch's (B, H, L, L) tensor is ever held.
- ``embedding``: each gene's contextual embedding (last layer) averaged over the cells that
  hold it, centred over genes (contextual vectors share a large common component), and the
  cosine between TF and target.
- ``deletion``: delete the TF's token in silico and measure how far each other gene's
  contextual embedding moves (``1 - cos``), averaged over cells
  (:func:`cellfoundry.in_silico.in_silico_perturbation`).

All three stream over cells in batches: memory depends on the batch size and the universe,
not on the number of cells. Genes outside the vocabulary or never inside a cell's context
window get no score (ranked last by the evaluation).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellfoundry.grn.edges import GeneUniverse


def _universe_lookup(adata: Any, universe: GeneUniverse, tokenizer: Any) -> np.ndarray:
    """Vocabulary-sized array: universe position of each token id, -1 elsewhere."""
    from cellfoundry.genes import resolve_genes

    tokens = tokenizer.column_tokens(resolve_genes(adata.var).ensembl_ids)
    lookup = np.full(len(tokenizer.vocab), -1, dtype=np.int64)
    for position, column in enumerate(universe.columns):
        if tokens[column] >= 0:
            lookup[tokens[column]] = position
    if (lookup >= 0).sum() == 0:
        raise ValueError("No gene of the universe is in the model's vocabulary.")
    return lookup


def _setup(adata: Any, universe: GeneUniverse, model: Any, device: str | None):
    """(encoder, device, tokenizer, universe lookup) of a model method."""
    from cellfoundry.embedding import _load_encoder, _tokenizer_for

    encoder, device_obj = _load_encoder(model, device)
    tokenizer = _tokenizer_for(encoder, None)
    return encoder, device_obj, tokenizer, _universe_lookup(adata, universe, tokenizer)


def _cell_rows(n_obs: int, max_cells: int | None, seed: int) -> np.ndarray:
    rows = np.arange(n_obs)
    if max_cells is not None and n_obs > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    return rows


def _batches(adata, encoder, tokenizer, rows, batch_size, max_length, tokenize_options):
    """Padded (ids, mask, context) batches of the chosen cells, tokenized chunk by chunk."""
    from cellfoundry.embedding import _context_length, _length_sorted_batches, _pad_batch
    from cellfoundry.tokenization import TokenizeOptions, TokenizeReport, iter_tokenized

    limit = _context_length(encoder, max_length)
    options = TokenizeOptions(max_length=limit, chunk_size=1024, **tokenize_options)
    report = TokenizeReport(input="<AnnData>")
    for block in iter_tokenized(adata[rows], tokenizer, options, report):
        order = np.argsort(-block.ranked.lengths, kind="stable")
        for cells in _length_sorted_batches(order, block.ranked.lengths, batch_size, None):
            yield _pad_batch(block.ranked, cells, block.context[cells], tokenizer.vocab.pad_id)


def _attention_probabilities(layers, captured: dict, mask) -> Any:
    """Head- and layer-averaged attention (B, L, L) from the captured query/key outputs."""
    import torch

    total = None
    for index, layer in enumerate(layers):
        attention = layer.attention
        query, key = captured[(index, "query")], captured[(index, "key")]
        batch, length, _ = query.shape
        shape = (batch, length, attention.num_heads, attention.head_dim)
        logits = (
            query.view(shape).transpose(1, 2) @ key.view(shape).transpose(1, 2).transpose(-1, -2)
        ) * attention.scaling
        logits = logits.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(logits.dtype).min)
        probabilities = logits.softmax(dim=-1).mean(dim=1)
        total = probabilities if total is None else total + probabilities
    return total / len(layers)


def _add_pairs(sums, counts, positions, values) -> None:
    """Add ``values[b, i, j]`` at (positions[b, i], positions[b, j]) where both are >= 0."""
    import torch

    size = int(np.sqrt(sums.numel()))
    both = (positions[:, :, None] >= 0) & (positions[:, None, :] >= 0)
    flat = positions[:, :, None] * size + positions[:, None, :]
    sums.index_add_(0, flat[both], values[both].to(sums.dtype))
    counts.index_add_(0, flat[both], torch.ones_like(flat[both], dtype=counts.dtype))


def attention_edges(
    adata: Any,
    universe: GeneUniverse,
    model: Any = "cellfoundry-tiny-bert",
    max_cells: int | None = 2000,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str | None = None,
    seed: int = 0,
    **tokenize_options: Any,
) -> pd.DataFrame:
    """TF -> target scores from attention, averaged over heads, layers and cells (see module).

    Raises
    ------
    ValueError
        For a backbone without attention layers (CellMamba): use ``embedding`` or
        ``deletion`` there.
    """
    import torch

    encoder, device_obj, tokenizer, lookup = _setup(adata, universe, model, device)
    lookup = torch.from_numpy(lookup)
    layers = getattr(encoder, "layers", [])
    if not layers or not all(hasattr(layer, "attention") for layer in layers):
        raise ValueError(
            f"method 'attention' needs an attention backbone; {encoder.config.model_type} has "
            "none. Use method 'embedding' or 'deletion' with this model."
        )
    size = len(universe.genes)
    sums = torch.zeros(size * size, dtype=torch.float64)
    counts = torch.zeros(size * size, dtype=torch.int64)
    captured: dict = {}
    hooks = []
    for index, layer in enumerate(layers):
        for name in ("query", "key"):
            module = getattr(layer.attention, name)
            hooks.append(
                module.register_forward_hook(
                    lambda _m, _i, out, key=(index, name): captured.__setitem__(key, out)
                )
            )
    rows = _cell_rows(adata.n_obs, max_cells, seed)
    try:
        with torch.inference_mode():
            for ids, mask, context in _batches(
                adata, encoder, tokenizer, rows, batch_size, max_length, tokenize_options
            ):
                encoder(
                    ids.to(device_obj),
                    attention_mask=mask.to(device_obj),
                    context_ids=context.to(device_obj),
                )
                probabilities = _attention_probabilities(layers, captured, mask.to(device_obj))
                positions = torch.where(mask.bool(), lookup[ids], -1)
                _add_pairs(sums, counts, positions, probabilities.float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / counts).numpy().reshape(size, size)
    symmetric = (mean + mean.T) / 2
    return universe.edge_table(symmetric[universe.tf_positions()])


def embedding_similarity_edges(
    adata: Any,
    universe: GeneUniverse,
    model: Any = "cellfoundry-tiny-bert",
    max_cells: int | None = 2000,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str | None = None,
    seed: int = 0,
    **tokenize_options: Any,
) -> pd.DataFrame:
    """Cosine of cell-averaged, gene-centred contextual embeddings of TF and target."""
    import torch

    encoder, device_obj, tokenizer, lookup = _setup(adata, universe, model, device)
    lookup = torch.from_numpy(lookup)
    size, width = len(universe.genes), encoder.config.hidden_size
    sums = torch.zeros((size, width), dtype=torch.float64)
    counts = torch.zeros(size, dtype=torch.int64)
    rows = _cell_rows(adata.n_obs, max_cells, seed)
    with torch.inference_mode():
        for ids, mask, context in _batches(
            adata, encoder, tokenizer, rows, batch_size, max_length, tokenize_options
        ):
            hidden = encoder(
                ids.to(device_obj),
                attention_mask=mask.to(device_obj),
                context_ids=context.to(device_obj),
            ).last_hidden_state
            positions = torch.where(mask.bool(), lookup[ids], -1)
            seen = positions >= 0
            sums.index_add_(0, positions[seen], hidden.float().cpu()[seen].double())
            counts.index_add_(0, positions[seen], torch.ones_like(positions[seen]))
    present = counts.numpy() > 0
    mean = np.full((size, width), np.nan)
    mean[present] = (sums[present] / counts[present, None]).numpy()
    mean[present] -= mean[present].mean(axis=0)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    unit = mean / np.where(norm > 0, norm, np.inf)
    return universe.edge_table(unit[universe.tf_positions()] @ unit.T)


def deletion_edges(
    adata: Any,
    universe: GeneUniverse,
    model: Any = "cellfoundry-tiny-bert",
    max_cells: int | None = 300,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    progress: bool = False,
    **tokenize_options: Any,
) -> pd.DataFrame:
    """Mean shift (1 - cos) of each target's contextual embedding when the TF is deleted.

    ``output_dir`` keeps the resumable in-silico run (default: a temporary folder).
    """
    from cellfoundry.in_silico import in_silico_perturbation

    encoder, device_obj, tokenizer, lookup = _setup(adata, universe, model, device)
    tf_positions = universe.tf_positions()
    in_vocab = [t for t, p in zip(universe.tfs, tf_positions, strict=True) if (lookup == p).any()]
    matrix = np.full((len(universe.tfs), len(universe.genes)), np.nan)
    if not in_vocab:
        return universe.edge_table(matrix)
    symbols = np.asarray(adata.var_names.astype(str).str.upper())
    names = {t: str(adata.var_names[np.flatnonzero(symbols == t)[0]]) for t in in_vocab}
    with tempfile.TemporaryDirectory() as scratch:
        result = in_silico_perturbation(
            adata,
            [names[t] for t in in_vocab],
            output_dir or scratch,
            model=encoder,
            mode="delete",
            max_cells=max_cells,
            batch_size=batch_size,
            max_length=max_length,
            n_affected=len(tokenizer.vocab),
            device=str(device_obj),
            seed=seed,
            progress=progress,
            **tokenize_options,
        )
    affected = result.affected
    token = affected["affected_ensembl_id"].map(lambda e: tokenizer.vocab.token_to_id.get(e))
    target = lookup[token.fillna(0).astype(np.int64).to_numpy()]
    tf_row = {names[t]: i for i, t in enumerate(universe.tfs) if t in names}
    row = affected["gene"].map(tf_row).to_numpy()
    ok = (target >= 0) & token.notna().to_numpy()
    matrix[row[ok].astype(int), target[ok]] = affected["shift_mean"].to_numpy()[ok]
    return universe.edge_table(matrix)
