"""Per-cell context tokens (species, assay/technology, modality) from arguments or obs columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellfoundry.tokenization.vocab import CONTEXT_FIELDS, CONTEXT_NORMALIZERS, GeneVocab


@dataclass(frozen=True)
class ContextSpec:
    """Where each context field comes from: a fixed value, an obs column, or auto-detection.

    For a field, a value (``species="human"``) wins over a column (``species_key="org"``);
    with neither, an obs column named like the field is used when present, else a default
    (species from the gene ids, assay ``unknown``, modality ``spatial`` when ``obsm`` has
    ``spatial`` coordinates).
    """

    species: str | None = None
    assay: str | None = None
    modality: str | None = None
    species_key: str | None = None
    assay_key: str | None = None
    modality_key: str | None = None


def context_ids(
    spec: ContextSpec,
    obs: pd.DataFrame,
    vocab: GeneVocab,
    detected_species: str,
    obsm_keys: list[str],
) -> np.ndarray:
    """Return int32 (cells, 3) vocabulary ids for species, assay, modality."""
    defaults = {
        "species": detected_species,
        "assay": "unknown",
        "modality": "spatial" if "spatial" in obsm_keys else "dissociated",
    }
    columns = []
    for name in CONTEXT_FIELDS:
        value = getattr(spec, name)
        key = getattr(spec, f"{name}_key")
        normalize = CONTEXT_NORMALIZERS[name]
        if value is not None:
            ids = np.full(len(obs), vocab.context_id(name, normalize(value)), dtype=np.int32)
        elif key is not None or name in obs.columns:
            column = key or name
            if column not in obs.columns:
                raise ValueError(
                    f"obs column {column!r} for the {name} context token is missing; obs has "
                    f"{list(obs.columns)[:20]}. Pass --{name} VALUE or an existing column."
                )
            ids = _map_column(obs[column], name, normalize, vocab)
        else:
            ids = np.full(len(obs), vocab.context_id(name, defaults[name]), dtype=np.int32)
        columns.append(ids)
    return np.stack(columns, axis=1).astype(np.int32)


def _map_column(series: pd.Series, name: str, normalize, vocab: GeneVocab) -> np.ndarray:
    codes, uniques = pd.factorize(series.astype(str), sort=False)
    lookup = np.array([vocab.context_id(name, normalize(u)) for u in uniques], dtype=np.int32)
    return lookup[codes]
