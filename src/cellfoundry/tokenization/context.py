"""Per-cell context tokens (species, assay/technology, modality) from arguments or obs columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellfoundry.tokenization.anndata_io import ObsTable
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


class ContextMapper:
    """Context ids (species, assay, modality) of the cells of each chunk of one input.

    Why in two steps: columns are checked and every value in them is normalised once, up front
    (scanning obs column slices, never a whole column), so a missing column or an unknown
    value fails before any output, in the same order as when all of obs was in memory;
    chunks then only look their values up.
    """

    def __init__(
        self,
        spec: ContextSpec,
        obs: ObsTable,
        vocab: GeneVocab,
        detected_species: str,
        obsm_keys: list[str],
    ) -> None:
        defaults = {
            "species": detected_species,
            "assay": "unknown",
            "modality": "spatial" if "spatial" in obsm_keys else "dissociated",
        }
        # per field: a fixed id, or (obs column, {value as str: id})
        self._fields: list[int | tuple[str, dict[str, int]]] = []
        for name in CONTEXT_FIELDS:
            value = getattr(spec, name)
            key = getattr(spec, f"{name}_key")
            normalize = CONTEXT_NORMALIZERS[name]
            if value is not None:
                self._fields.append(vocab.context_id(name, normalize(value)))
            elif key is not None or name in obs.columns:
                column = key or name
                if column not in obs.columns:
                    raise ValueError(
                        f"obs column {column!r} for the {name} context token is missing; obs has "
                        f"{list(obs.columns)[:20]}. Pass --{name} VALUE or an existing column."
                    )
                lookup = {u: vocab.context_id(name, normalize(u)) for u in _values(obs, column)}
                self._fields.append((column, lookup))
            else:
                self._fields.append(vocab.context_id(name, defaults[name]))

    @property
    def columns(self) -> list[str]:
        """The obs columns :meth:`ids` reads."""
        return list(dict.fromkeys(f[0] for f in self._fields if isinstance(f, tuple)))

    def ids(self, obs: pd.DataFrame) -> np.ndarray:
        """Return int32 (cells, 3) vocabulary ids for the rows of ``obs`` (a chunk's rows)."""
        columns = []
        for field in self._fields:
            if isinstance(field, tuple):
                column, lookup = field
                codes, uniques = pd.factorize(obs[column].astype(str), sort=False)
                ids = np.array([lookup[u] for u in uniques], dtype=np.int32)[codes]
            else:
                ids = np.full(len(obs), field, dtype=np.int32)
            columns.append(ids)
        return np.stack(columns, axis=1).astype(np.int32)


def _values(obs: ObsTable, column: str) -> list:
    """Distinct values of a column as strings, in order of first appearance (slice by slice)."""
    seen: dict = {}
    for _, series in obs.column_slices(column):
        for value in pd.factorize(series.astype(str), sort=False)[1]:
            seen.setdefault(value, None)
    return list(seen)
