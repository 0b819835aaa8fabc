"""In-silico perturbation: delete a gene from, or move it to the front of, each cell's rank tokens
and measure how the encoder's view of the cell and of its other genes moves.

Geneformer's idea, our implementation. For each perturbed gene ``g`` and cell ``c``:

- ``cell_shift = 1 - cos(e(c), e(c with g perturbed))`` on pooled cell embeddings;
- with a target state (e.g. from control toward IFN-beta-stimulated cells):
  ``target_shift = cos(e(c'), t) - cos(e(c), t)``, ``t`` the mean embedding of the target
  cells (> 0: the perturbation moved the cell toward the target state);
- per other gene ``h`` of the cell, ``1 - cos`` between its contextual embeddings before and
  after (``affected``: mean over the cells holding both genes).

``delete`` perturbs only cells whose tokens hold ``g`` (a gene outside the context window has no
input to remove); ``overexpress`` moves ``g`` right after ``<cls>``, and inserts it there in
cells that lack it (their last token then falls out when the context is full).

Memory is bounded by the batch size: cells are tokenized in chunks, the unperturbed hidden
states of one batch of cells are kept while that batch's perturbed copies run, and only sums
leave the batch. Work is cut into units (a chunk of genes x a chunk of cells); each unit's
results go to ``shards/`` atomically, so an interrupted run resumes where it stopped, and the
final tables are assembled from the shards: ``genes.tsv``, ``cells.tsv.gz`` (one row per
perturbed gene and cell) and ``affected.tsv`` (the most shifted genes per perturbed gene).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MODES = ("delete", "overexpress")
SETTINGS_FILE = "settings.json"
SHARDS = "shards"


@dataclass(frozen=True)
class TargetState:
    """Cells to perturb (``source``) and the state to move them toward (``target``), by an obs
    column, e.g. ``TargetState("perturbation", "control", "IFN-beta")``."""

    key: str
    source: str
    target: str


@dataclass
class InSilicoResult:
    """Per-gene summary, per (gene, cell) shifts, and the most affected genes per gene."""

    genes: pd.DataFrame
    cells: pd.DataFrame
    affected: pd.DataFrame


def _gene_tokens(var: pd.DataFrame, genes: list[str], tokenizer: Any) -> dict[str, int]:
    """Token id of each requested gene (symbol or Ensembl id as in the data); clear errors."""
    from cellfoundry.genes import resolve_genes

    resolution = resolve_genes(var)
    tokens = tokenizer.column_tokens(resolution.ensembl_ids)
    by_name: dict[str, int] = {}
    for column, name in enumerate(var.index.astype(str)):
        for key in (name.upper(), str(resolution.ensembl_ids[column]).upper()):
            if key and tokens[column] >= 0:
                by_name.setdefault(key, int(tokens[column]))
    found, unknown = {}, []
    for gene in genes:
        token = by_name.get(str(gene).upper())
        if token is None:
            unknown.append(gene)
        else:
            found[gene] = token
    if unknown:
        raise ValueError(
            f"Unknown perturbation gene(s) {unknown}: not among the data's genes that the "
            f"{tokenizer.name} vocabulary holds. Give symbols or Ensembl ids as in var_names "
            "(e.g. 'STAT1'); genes the data does not measure cannot be perturbed."
        )
    return found


def _select_cells(obs: pd.DataFrame, target: TargetState | None, max_cells: int | None, seed: int):
    """Row positions to perturb: the source cells (or all), at most ``max_cells``, seeded."""
    rows = np.arange(len(obs))
    if target is not None:
        if target.key not in obs.columns:
            raise ValueError(
                f"No obs column {target.key!r} for the target state (columns: {list(obs.columns)})."
            )
        values = obs[target.key].astype(str).to_numpy()
        for role, value in (("source", target.source), ("target", target.target)):
            if not (values == value).any():
                raise ValueError(
                    f"No {role} cells: obs[{target.key!r}] has no {value!r} (values: "
                    f"{sorted(set(values))[:10]}); name the control and goal states as written."
                )
        rows = np.flatnonzero(values == target.source)
    if max_cells is not None and rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    return rows


def _perturbed(cell: np.ndarray, token: int, mode: str, limit: int):
    """(perturbed ids, original position of each perturbed position or -1); None: no-op."""
    where = np.flatnonzero(cell == token)
    positions = np.arange(cell.size)
    if mode == "delete":
        if where.size == 0:
            return None
        keep = positions != where[0]
        return cell[keep], positions[keep]
    if where.size:  # move to the front (after <cls>)
        rest = positions[(positions != where[0]) & (positions != 0)]
        order = np.concatenate([[0, where[0]], rest])
        return cell[order], order
    order = np.concatenate([[0], positions[1:]])[: limit - 1]
    ids = np.concatenate([cell[:1], [token], cell[order[1:]]])
    return ids, np.concatenate([[0, -1], order[1:]])


def _run_unit(encoder, device, block, cells_in_block, tokens, settings, centroid) -> dict:
    """Shifts of every (gene, cell) pair of one unit, and per-affected-gene sums."""
    import torch
    from torch.nn import functional

    from cellfoundry.embedding import _pad_batch
    from cellfoundry.models import pool_hidden_states

    ranked, pad = block.ranked, settings["pad_id"]
    rows, genes, shifts, toward = [], [], [], []
    gene_index = {token: i for i, token in enumerate(tokens)}
    affected_sum = np.zeros((len(tokens), settings["vocab_size"]))
    affected_count = np.zeros((len(tokens), settings["vocab_size"]), dtype=np.int64)
    batch = settings["batch_size"]
    for start in range(0, cells_in_block.size, batch):
        cells = cells_in_block[start : start + batch]
        ids, mask, context = _pad_batch(ranked, cells, block.context[cells], pad)
        hidden = encoder(
            ids.to(device), attention_mask=mask.to(device), context_ids=context.to(device)
        ).last_hidden_state
        pooled = pool_hidden_states(hidden, mask.to(device), settings["pooling"])
        pairs = []
        for row, cell in enumerate(cells):
            original = ranked.cell(int(cell))
            for token in tokens:
                made = _perturbed(original, token, settings["mode"], settings["max_length"])
                if made is not None:
                    pairs.append((row, token, *made))
        for first in range(0, len(pairs), batch):
            part = pairs[first : first + batch]
            length = max(p[2].size for p in part)
            p_ids = torch.full((len(part), length), pad, dtype=torch.long)
            p_mask = torch.zeros((len(part), length), dtype=torch.long)
            source = torch.full((len(part), length), -1, dtype=torch.long)
            for i, (_, _, made_ids, origin) in enumerate(part):
                p_ids[i, : made_ids.size] = torch.from_numpy(made_ids.astype(np.int64))
                p_mask[i, : made_ids.size] = 1
                source[i, : origin.size] = torch.from_numpy(origin)
            owner = torch.tensor([p[0] for p in part])
            p_hidden = encoder(
                p_ids.to(device),
                attention_mask=p_mask.to(device),
                context_ids=context[owner].to(device),
            ).last_hidden_state
            p_pooled = pool_hidden_states(p_hidden, p_mask.to(device), settings["pooling"])
            before = pooled[owner.to(device)]
            shifts.append(
                (1 - functional.cosine_similarity(before, p_pooled, dim=-1)).float().cpu()
            )
            if centroid is not None:
                goal = centroid.to(device)[None]
                toward.append(
                    (
                        functional.cosine_similarity(p_pooled, goal)
                        - functional.cosine_similarity(before, goal)
                    )
                    .float()
                    .cpu()
                )
            # Per-token change of the genes both versions hold (not <cls>, not the gene itself).
            aligned = (source > 0).to(device) & (
                p_ids.to(device) != torch.tensor([p[1] for p in part], device=device)[:, None]
            )
            gather = source.clamp(min=0).to(device)
            original_states = hidden[owner.to(device)[:, None], gather]
            token_shift = 1 - functional.cosine_similarity(original_states, p_hidden, dim=-1)
            token_shift = token_shift.float().cpu().numpy()
            hit = aligned.cpu().numpy()
            which = np.array([gene_index[p[1]] for p in part])[:, None].repeat(length, axis=1)
            np.add.at(affected_sum, (which[hit], p_ids.numpy()[hit]), token_shift[hit])
            np.add.at(affected_count, (which[hit], p_ids.numpy()[hit]), 1)
            rows.extend(int(block.rows[cells[p[0]]]) for p in part)
            genes.extend(p[1] for p in part)
    pair_shift = torch.cat(shifts).numpy() if shifts else np.zeros(0, np.float32)
    seen = np.nonzero(affected_count)
    keys = np.stack([np.asarray(tokens, dtype=np.int64)[seen[0]], seen[1]], axis=1)
    sums = np.stack([affected_sum[seen], affected_count[seen]], axis=1)
    return {
        "row": np.asarray(rows, dtype=np.int64),
        "token": np.asarray(genes, dtype=np.int64),
        "cell_shift": pair_shift,
        "target_shift": torch.cat(toward).numpy() if toward else np.full(len(rows), np.nan),
        "affected_keys": keys,
        "affected_sums": sums,
    }


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from cellfoundry._io import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _check_settings(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """A folder holds one run: resume only with the same settings."""
    from cellfoundry._io import atomic_write_text

    path = folder / SETTINGS_FILE
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    if path.is_file() and not overwrite:
        if json.loads(path.read_text()) != json.loads(text):
            raise ValueError(
                f"{folder} holds an in-silico run with other settings; use another folder, "
                "or overwrite=True (--overwrite) to start again there."
            )
        return
    if overwrite and (folder / SHARDS).is_dir():
        for shard in (folder / SHARDS).glob("*.npz"):
            shard.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def in_silico_perturbation(
    adata: Any,
    genes: list[str],
    output_dir: str | Path,
    model: Any = "cellfoundry-tiny-bert",
    mode: str = "delete",
    target: TargetState | None = None,
    max_cells: int | None = None,
    batch_size: int = 16,
    genes_per_unit: int = 8,
    cells_per_unit: int = 256,
    pooling: str = "mean",
    max_length: int | None = None,
    n_affected: int = 50,
    device: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **tokenize_options: Any,
) -> InSilicoResult:
    """Perturb ``genes`` in silico in the cells of ``adata``; write and return the shift tables.

    Parameters
    ----------
    adata : AnnData or path
        Raw counts (as for :func:`cellfoundry.embed`).
    genes : list of str
        Genes to perturb, as symbols or Ensembl ids of the data's var (unknown ones raise).
    output_dir : path
        Run folder: ``settings.json``, ``shards/`` (resume units) and the result tables.
    model : str or model
        Pretrained encoder (shipped name, folder, Hub id or loaded).
    mode : {"delete", "overexpress"}
        Remove the gene's token, or move it right after ``<cls>``.
    target : TargetState or None
        Perturb only the ``source`` cells and score moves toward the ``target`` cells' mean
        embedding; ``None`` perturbs every cell and has no target shift.
    max_cells : int or None
        Perturb at most this many (source) cells, drawn with ``seed``.
    batch_size : int
        Sequences per forward pass: what bounds memory.
    genes_per_unit, cells_per_unit : int
        Size of a resumable unit of work.
    pooling : {"mean", "cls"}
        Cell embedding (mean: the pretrained ``<cls>`` vector barely varies across cells).
    max_length : int or None
        Tokens per cell (default: the model's context).
    n_affected : int
        Genes kept per perturbed gene in ``affected.tsv`` (largest mean shift first).

    Returns
    -------
    InSilicoResult
    """
    import anndata as ad
    import torch
    from tqdm.auto import tqdm

    from cellfoundry.embedding import _context_length, _load_encoder, _tokenizer_for, embed
    from cellfoundry.tokenization import TokenizeOptions, TokenizeReport, iter_tokenized

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}.")
    if not genes:
        raise ValueError("No genes to perturb; pass at least one gene symbol or Ensembl id.")
    adata = ad.read_h5ad(adata) if isinstance(adata, (str, Path)) else adata
    encoder, device_obj = _load_encoder(model, device)
    tokenizer = _tokenizer_for(encoder, None)
    tokens = _gene_tokens(adata.var, list(genes), tokenizer)
    rows = _select_cells(adata.obs, target, max_cells, seed)
    limit = _context_length(encoder, max_length)
    folder = Path(output_dir)
    settings = {
        "genes": list(genes),
        "mode": mode,
        "target": asdict(target) if target else None,
        "max_cells": max_cells,
        "batch_size": batch_size,
        "genes_per_unit": genes_per_unit,
        "cells_per_unit": cells_per_unit,
        "pooling": pooling,
        "max_length": limit,
        "seed": seed,
        "model": str(getattr(encoder, "name_or_path", model)),
        "n_obs": int(adata.n_obs),
        "cells_sha256": hashlib.sha256("\n".join(adata.obs_names[rows]).encode()).hexdigest(),
    }
    _check_settings(folder, settings, overwrite)
    centroid = None
    if target is not None:
        values = adata.obs[target.key].astype(str).to_numpy()
        goal = adata[values == target.target]
        vectors = embed(
            goal,
            encoder,
            pooling=pooling,
            max_length=limit,
            key_added=None,
            progress=False,
            device=str(device_obj),
            **tokenize_options,
        )
        centroid = torch.from_numpy(np.nanmean(vectors, axis=0))
    cells = adata[rows].copy()  # at most max_cells cells
    options = TokenizeOptions(max_length=limit, chunk_size=cells_per_unit, **tokenize_options)
    run = {**settings, "pad_id": tokenizer.vocab.pad_id, "vocab_size": len(tokenizer.vocab)}
    names = list(tokens)
    units = [names[i : i + genes_per_unit] for i in range(0, len(names), genes_per_unit)]
    shards = folder / SHARDS
    bar = tqdm(
        total=len(units) * max(1, -(-rows.size // cells_per_unit)),
        disable=not progress,
        desc="in-silico units",
    )
    with torch.inference_mode():
        for gene_unit, unit_genes in enumerate(units):
            report = TokenizeReport(input="<AnnData>")
            for cell_unit, block in enumerate(iter_tokenized(cells, tokenizer, options, report)):
                path = shards / f"g{gene_unit:05d}-c{cell_unit:05d}.npz"
                if not path.is_file():
                    order = np.arange(block.rows.size)
                    result = _run_unit(
                        encoder,
                        device_obj,
                        block,
                        order,
                        [tokens[g] for g in unit_genes],
                        run,
                        centroid,
                    )
                    result["row"] = rows[result["row"]]  # positions in adata, not the subset
                    _write_npz(path, result)
                bar.update(1)
    bar.close()
    return _assemble(folder, adata, tokens, tokenizer, n_affected)


def _assemble(folder: Path, adata: Any, tokens: dict[str, int], tokenizer: Any, n_affected: int):
    """Read every shard; write genes.tsv, cells.tsv.gz and affected.tsv atomically."""
    from cellfoundry._io import atomic_write_bytes, atomic_write_text
    from cellfoundry.genes import load_gene_maps

    parts = [dict(np.load(p)) for p in sorted((folder / SHARDS).glob("*.npz"))]
    name_of = {token: gene for gene, token in tokens.items()}
    vocab = tokenizer.vocab
    cells = pd.DataFrame(
        {
            "gene": [name_of[int(t)] for p in parts for t in p["token"]],
            "cell": [str(adata.obs_names[int(r)]) for p in parts for r in p["row"]],
            "cell_shift": np.concatenate([p["cell_shift"] for p in parts]) if parts else [],
            "target_shift": np.concatenate([p["target_shift"] for p in parts]) if parts else [],
        }
    )
    grouped = cells.groupby("gene", sort=False)
    genes = pd.DataFrame({"gene": list(tokens), "token": list(tokens.values())})
    genes["ensembl_id"] = [vocab.id_to_token(t) for t in genes["token"]]
    genes["n_cells"] = genes["gene"].map(grouped.size()).fillna(0).astype(int)
    for column in ("cell_shift", "target_shift"):
        genes[f"{column}_mean"] = genes["gene"].map(grouped[column].mean())
        genes[f"{column}_sd"] = genes["gene"].map(grouped[column].std())
    genes = genes.sort_values("cell_shift_mean", ascending=False, na_position="last")
    sums: dict[tuple[int, int], np.ndarray] = {}
    for p in parts:
        for key, value in zip(map(tuple, p["affected_keys"]), p["affected_sums"], strict=True):
            sums[key] = sums.get(key, 0) + value
    rows = [
        (name_of[g], vocab.id_to_token(h), total / count, int(count))
        for (g, h), (total, count) in sums.items()
    ]
    affected = pd.DataFrame(rows, columns=["gene", "affected_ensembl_id", "shift_mean", "n_cells"])
    affected.insert(
        2, "affected_symbol", load_gene_maps().symbols_of(affected["affected_ensembl_id"])
    )
    affected = (
        affected.sort_values(["gene", "shift_mean"], ascending=[True, False])
        .groupby("gene", sort=False)
        .head(n_affected)
        .reset_index(drop=True)
    )
    atomic_write_text(folder / "genes.tsv", genes.to_csv(sep="\t", index=False))
    atomic_write_text(folder / "affected.tsv", affected.to_csv(sep="\t", index=False))
    atomic_write_bytes(folder / "cells.tsv.gz", _gzip_tsv(cells))
    return InSilicoResult(genes.reset_index(drop=True), cells, affected)


def _gzip_tsv(table: pd.DataFrame) -> bytes:
    import gzip

    return gzip.compress(table.to_csv(sep="\t", index=False).encode(), mtime=0)
