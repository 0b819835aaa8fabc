"""From ``.h5ad`` / AnnData to a ``datasets`` Arrow dataset on disk, streaming in chunks.

Layout of an output folder (opened by ``datasets.load_from_disk``)::

    OUT_DIR/data-00000-of-0000N.arrow   one Arrow shard per input file (stream format)
    OUT_DIR/state.json, dataset_info.json   what load_from_disk reads
    OUT_DIR/manifest.json               inputs, shards, cells, tokenizer id + vocab hash, reports

Shard names depend only on the input's position in the (sorted, glob-expanded) input list,
so nodes of a cluster that split the list (``node_rank``/``num_nodes``) write the same shards
as one machine would. Each shard is written to a temporary file and renamed; a one-node run
builds the whole folder in a temporary sibling and renames it, so a failed run leaves nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from cellfoundry._io import atomic_directory, atomic_write_text
from cellfoundry.tokenization.anndata_io import CountReader, ObsTable
from cellfoundry.tokenization.context import ContextMapper, ContextSpec
from cellfoundry.tokenization.rank_value import RankedChunk, RankValueTokenizer

logger = logging.getLogger(__name__)
MANIFEST_FILE = "manifest.json"


@dataclass
class TokenizeOptions:
    """Everything that changes the tokens or the columns written (recorded in the manifest)."""

    max_length: int | None = None
    context: ContextSpec = field(default_factory=ContextSpec)
    keep_obs: tuple[str, ...] = ()
    layer: str | None = None
    allow_normalized: bool = False
    gene_column: str | None = None
    species: str = "auto"  # species of the gene ids: auto | human | mouse
    chunk_size: int | None = None
    backend: str = "auto"


@dataclass
class TokenizeReport:
    """What one input produced; printed by the CLI and stored in the manifest."""

    input: str
    n_cells_in: int = 0
    n_cells_out: int = 0
    n_empty_dropped: int = 0
    n_no_vocab_gene_dropped: int = 0
    n_tokens: int = 0
    genes: dict = field(default_factory=dict)
    n_genes_in_vocab: int = 0
    seconds: float = 0.0
    shard: str | None = None

    @property
    def tokens_per_cell(self) -> float:
        return self.n_tokens / max(self.n_cells_out, 1)

    @property
    def cells_per_second(self) -> float:
        return self.n_cells_in / max(self.seconds, 1e-9)


@dataclass
class TokenizedBlock:
    """One chunk of tokenized cells with their row positions in the input."""

    rows: np.ndarray  # int64 indices into the input's cells (kept cells only)
    ranked: RankedChunk
    context: np.ndarray  # int32 (cells, 3)
    obs: pd.DataFrame  # the kept cells' obs rows: index (cell ids) + the obs_columns asked for


def iter_tokenized(
    source,
    tokenizer: RankValueTokenizer,
    options: TokenizeOptions,
    report: TokenizeReport,
    reader: CountReader | None = None,
    obs_columns: Sequence[str] = (),
) -> Iterator[TokenizedBlock]:
    """Yield tokenized chunks of ``source`` (path or AnnData); fills ``report`` as it goes.

    Each block carries its cells' obs index and ``obs_columns``, read chunk by chunk.
    """
    from cellfoundry.genes import resolve_genes

    own_reader = reader is None
    reader = reader or CountReader(
        source, options.layer, options.allow_normalized, options.chunk_size
    )
    try:
        resolution = resolve_genes(
            reader.var, species=options.species, gene_column=options.gene_column
        )
        column_tokens = tokenizer.column_tokens(resolution.ensembl_ids)
        report.genes = resolution.to_dict()
        report.n_genes_in_vocab = int(np.unique(column_tokens[column_tokens >= 0]).size)
        if report.n_genes_in_vocab == 0:
            seen = [str(v) for v in list(reader.var.index[:5])]
            raise ValueError(
                f"No gene of the input is in the {tokenizer.name} vocabulary (ids seen: {seen}). "
                "Check that var_names or a var column holds Ensembl ids or gene symbols of a "
                "supported species, or use a tokenizer built for this gene panel."
            )
        context = ContextMapper(
            options.context, reader.obs, tokenizer.vocab, resolution.species, reader.obsm_keys
        )
        report.n_cells_in = reader.n_obs
        for chunk in reader.chunks([*context.columns, *obs_columns]):
            alive = chunk.n_counts > 0
            report.n_empty_dropped += int((~alive).sum())
            rows = np.flatnonzero(alive)
            ranked = tokenizer.rank(
                chunk.matrix[rows],
                chunk.n_counts[rows],
                column_tokens,
                options.max_length,
                options.backend,
            )
            has_gene = ranked.lengths > 1
            report.n_no_vocab_gene_dropped += int((~has_gene).sum())
            if not has_gene.all():
                ranked = _select(ranked, has_gene)
                rows = rows[has_gene]
            report.n_cells_out += rows.size
            report.n_tokens += int(ranked.lengths.sum())
            obs = chunk.obs.iloc[rows]
            yield TokenizedBlock(rows + chunk.start, ranked, context.ids(obs), obs)
    finally:
        if own_reader:
            reader.close()


def _select(ranked: RankedChunk, mask: np.ndarray) -> RankedChunk:
    keep_entries = np.repeat(mask, ranked.lengths)
    return RankedChunk(ranked.flat_ids[keep_entries], ranked.lengths[mask])


def _record_batch(block: TokenizedBlock, keep_obs: Sequence[str]):
    import pyarrow as pa

    ranked = block.ranked
    input_ids = pa.ListArray.from_arrays(
        pa.array(ranked.offsets.astype(np.int32)), pa.array(ranked.flat_ids, type=pa.int32())
    )
    context_offsets = np.arange(0, 3 * block.rows.size + 1, 3, dtype=np.int32)
    context = pa.ListArray.from_arrays(
        pa.array(context_offsets), pa.array(block.context.ravel(), type=pa.int32())
    )
    columns = {
        "input_ids": input_ids,
        "length": pa.array(ranked.lengths.astype(np.int32)),
        "context_ids": context,
        "cell_id": pa.array(block.obs.index.astype(str).to_numpy(), type=pa.string()),
    }
    for name in keep_obs:
        series = block.obs[name]
        if str(series.dtype) == "category" or series.dtype == object:
            series = series.astype(str)
        columns[name] = pa.array(series.to_numpy())
    return pa.RecordBatch.from_pydict(columns)


def tokenize_to_arrow(
    source,
    shard_path: Path,
    tokenizer: RankValueTokenizer,
    options: TokenizeOptions,
    progress: bool = False,
) -> TokenizeReport:
    """Tokenize one input into one Arrow stream file, written atomically."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    name = str(source) if isinstance(source, (str, Path)) else "<AnnData>"
    report = TokenizeReport(input=name, shard=shard_path.name)
    start = time.perf_counter()
    tmp = shard_path.with_name(f".{shard_path.name}.tmp")
    writer = None
    try:
        with CountReader(
            source, options.layer, options.allow_normalized, options.chunk_size
        ) as reader:
            _check_keep_obs(reader.obs, options.keep_obs)
            bar = tqdm(total=reader.n_obs, unit="cells", disable=not progress, desc=Path(name).name)
            blocks = iter_tokenized(source, tokenizer, options, report, reader, options.keep_obs)
            for block in blocks:
                if block.rows.size == 0:
                    continue
                batch = _record_batch(block, options.keep_obs)
                if writer is None:
                    writer = pa.ipc.new_stream(str(tmp), batch.schema)
                writer.write_batch(batch)
                bar.update(int(block.rows[-1] + 1 - bar.n) if block.rows.size else 0)
            bar.update(reader.n_obs - bar.n)
            bar.close()
            if writer is None:
                raise _nothing_tokenized(name, report)
        writer.close()
        writer = None
        tmp.replace(shard_path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def tokenize_to_table(
    source, tokenizer: RankValueTokenizer, options: TokenizeOptions, obs_columns: Sequence[str] = ()
):
    """Tokenize ``source`` (path or AnnData) into one in-memory Arrow table.

    For data that fits in memory and is used once, e.g. a labelled set being fine-tuned on:
    the same columns as a tokenized folder (``input_ids``, ``length``, ``context_ids``,
    ``cell_id`` and ``obs_columns``) plus ``row``, each cell's row in the input, so results
    can be written back next to the right cell. Cells dropped by tokenization (no counts, no
    vocabulary gene) have no row; the report counts them.

    Returns
    -------
    (pyarrow.Table, TokenizeReport)
    """
    import pyarrow as pa

    name = str(source) if isinstance(source, (str, Path)) else "<AnnData>"
    report = TokenizeReport(input=name)
    start = time.perf_counter()
    batches = []
    with CountReader(source, options.layer, options.allow_normalized, options.chunk_size) as reader:
        _check_keep_obs(reader.obs, obs_columns)
        for block in iter_tokenized(source, tokenizer, options, report, reader, obs_columns):
            if block.rows.size:
                batch = _record_batch(block, obs_columns)
                rows = pa.array(block.rows.astype(np.int64))
                batches.append(batch.append_column("row", rows))
    if not batches:
        raise _nothing_tokenized(name, report)
    report.seconds = time.perf_counter() - start
    return pa.Table.from_batches(batches), report


def _nothing_tokenized(name: str, report: TokenizeReport) -> ValueError:
    return ValueError(
        f"{name}: every cell was empty or had no vocabulary gene "
        f"({report.n_empty_dropped} empty, {report.n_no_vocab_gene_dropped} without "
        "vocabulary genes); nothing to tokenize. Check the matrix and the gene ids."
    )


def _check_keep_obs(obs: ObsTable, keep_obs: Sequence[str]) -> None:
    """Fail before any output: columns are checked by name (obs is not read)."""
    missing = [c for c in keep_obs if c not in obs.columns]
    if missing:
        raise ValueError(
            f"--keep-obs columns {missing} are not in obs; obs has {list(obs.columns)[:20]}."
        )
    reserved = {"input_ids", "length", "context_ids", "cell_id"} & set(keep_obs)
    if reserved:
        raise ValueError(f"obs columns {sorted(reserved)} clash with token columns; rename them.")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand globs (each sorted), keep the given order, refuse duplicates and missing files."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        matches = sorted(glob.glob(text)) if any(ch in text for ch in "*?[") else [text]
        if not matches:
            raise ValueError(f"No input file matches {text!r}.")
        paths += [Path(m) for m in matches]
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError("The same input file is listed twice; list each file once.")
    return paths


def shard_name(index: int, total: int) -> str:
    return f"data-{index:05d}-of-{total:05d}.arrow"


def _tokenize_one(args) -> dict:
    source, shard_path, tokenizer_ref, options, progress = args
    from cellfoundry.tokenization.registry import load_tokenizer

    tokenizer = (
        tokenizer_ref
        if isinstance(tokenizer_ref, RankValueTokenizer)
        else load_tokenizer(tokenizer_ref)
    )
    report = tokenize_to_arrow(source, Path(shard_path), tokenizer, options, progress)
    atomic_write_text(
        Path(shard_path).with_suffix(".report.json"), json.dumps(asdict(report)) + "\n"
    )
    return asdict(report)


def tokenize_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: RankValueTokenizer,
    options: TokenizeOptions | None = None,
    num_proc: int = 1,
    num_nodes: int = 1,
    node_rank: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> list[TokenizeReport]:
    """Tokenize many inputs into one dataset folder (one shard per input, ``num_proc`` at once).

    With ``num_nodes > 1`` only inputs ``i`` with ``i % num_nodes == node_rank`` are done; the
    folder is finalised (``state.json``, manifest) once every shard is present.
    """
    options = options or TokenizeOptions()
    paths = expand_inputs(inputs)
    out_dir = Path(out_dir)
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank must be in [0, {num_nodes}), not {node_rank}.")
    mine = [i for i in range(len(paths)) if i % num_nodes == node_rank]
    ref = tokenizer.path if tokenizer.path is not None else tokenizer

    def run(folder: Path) -> list[dict]:
        jobs = [
            (paths[i], folder / shard_name(i, len(paths)), ref, options, progress) for i in mine
        ]
        if num_proc <= 1 or len(jobs) <= 1:
            return [_tokenize_one(job) for job in jobs]
        with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn")) as pool:
            return list(pool.map(_tokenize_one, jobs))

    if num_nodes == 1:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            reports = run(tmp)
            finalize_dataset(tmp, tokenizer, options, len(paths))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        reports = run(out_dir)
        if all((out_dir / shard_name(i, len(paths))).exists() for i in range(len(paths))):
            finalize_dataset(out_dir, tokenizer, options, len(paths))
    return [TokenizeReport(**r) for r in reports]


def finalize_dataset(
    folder: Path, tokenizer: RankValueTokenizer, options: TokenizeOptions, n_shards: int
) -> None:
    """Write ``state.json``, ``dataset_info.json`` and ``manifest.json`` over finished shards."""
    import datasets
    import pyarrow as pa

    shards = [shard_name(i, n_shards) for i in range(n_shards)]
    missing = [s for s in shards if not (folder / s).exists()]
    if missing:
        raise ValueError(f"Cannot finalise {folder}: shards {missing[:3]} are missing.")
    schema = pa.ipc.open_stream(str(folder / shards[0])).schema
    features = datasets.Features.from_arrow_schema(schema)
    datasets.DatasetInfo(features=features).write_to_directory(str(folder))
    reports = [json.loads((folder / s).with_suffix(".report.json").read_text()) for s in shards]
    digest = hashlib.sha256(tokenizer.vocab.sha256.encode())
    for report in reports:
        digest.update(f"{report['input']}|{report['n_cells_out']}|{report['n_tokens']}".encode())
    state = {
        "_data_files": [{"filename": s} for s in shards],
        "_fingerprint": digest.hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    atomic_write_text(folder / "state.json", json.dumps(state, indent=2) + "\n")
    manifest = {
        "format": "cellfoundry-tokenized/1",
        "tokenizer_id": tokenizer.name,
        "vocab_sha256": tokenizer.vocab.sha256,
        "max_length": options.max_length or tokenizer.max_length,
        "context_fields": ["species", "assay", "modality"],
        "options": _jsonable(asdict(options)),
        "n_cells": int(sum(r["n_cells_out"] for r in reports)),
        "shards": [{"file": s, **r} for s, r in zip(shards, reports, strict=True)],
    }
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def load_tokenized(path: str | Path):
    """Open a tokenized folder as one ``datasets.Dataset`` (all shards), checking the manifest."""
    import datasets

    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        raise ValueError(f"{path} is not a cellfoundry tokenized folder ({MANIFEST_FILE} missing).")
    return datasets.load_from_disk(str(path))
