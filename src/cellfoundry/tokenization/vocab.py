"""Gene vocabulary: human Ensembl gene id <-> token id, plus special and context tokens.

The vocabulary is a plain JSON object ``{token: id}`` (never pickle). Ids are laid out as

* special tokens ``<pad>`` = 0, ``<mask>`` = 1, ``<cls>`` = 2, ``<unk>`` = 3,
* context tokens (``<species:human>``, ``<assay:10x_3prime>``, ``<modality:spatial>``, ...),
* gene tokens: human Ensembl gene ids, sorted, so that tie-breaking "by token id" is the same
  as tie-breaking by Ensembl id and does not depend on the corpus order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cellfoundry._io import atomic_write_text

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<mask>", "<cls>", "<unk>")
CONTEXT_FIELDS: tuple[str, ...] = ("species", "assay", "modality")

#: Context values every vocabulary carries, whatever the corpus held.
DEFAULT_CONTEXT_VALUES: dict[str, tuple[str, ...]] = {
    "species": ("human", "mouse", "other", "unknown"),
    "assay": (
        "10x_3prime",
        "10x_5prime",
        "10x_visium",
        "smartseq",
        "eccite_seq",
        "merfish",
        "seqfish",
        "starmap",
        "other",
        "unknown",
    ),
    "modality": ("dissociated", "spatial"),
}

_ENSEMBL_GENE = re.compile(r"^ENS[A-Z]*G\d{11}$")


def context_token(field_name: str, value: str) -> str:
    """Return the vocabulary token for one context value, e.g. ``<species:human>``."""
    return f"<{field_name}:{value}>"


def normalize_species(value: object) -> str:
    """Map free-text species labels (``Homo sapiens``, ``human``, ``mouse``) to a context value."""
    text = str(value).strip().lower()
    if text in {"human", "homo sapiens", "hs", "hsapiens", "9606"}:
        return "human"
    if text in {"mouse", "mus musculus", "mm", "mmusculus", "10090"}:
        return "mouse"
    if text in {"", "nan", "none", "unknown"}:
        return "unknown"
    return "other"


def normalize_assay(value: object) -> str:
    """Map a free-text assay / technology label to one of the vocabulary's assay values.

    Why: obs columns spell the same chemistry many ways ("10x Chromium 3' v2", "10x 3'
    (droplet)"); the model needs one token per technology family, not one per spelling.
    """
    text = str(value).strip().lower()
    if text in {"", "nan", "none", "unknown"}:
        return "unknown"
    rules = (
        ("visium", "10x_visium"),
        ("merfish", "merfish"),
        ("seqfish", "seqfish"),
        ("starmap", "starmap"),
        ("eccite", "eccite_seq"),
        ("smart-seq", "smartseq"),
        ("smartseq", "smartseq"),
    )
    for needle, token in rules:
        if needle in text:
            return token
    if "10x" in text or "chromium" in text:
        if "5'" in text or "5 prime" in text or "5prime" in text:
            return "10x_5prime"
        return "10x_3prime"
    return "other"


def normalize_modality(value: object) -> str:
    """Map a modality label to ``dissociated`` or ``spatial``."""
    text = str(value).strip().lower()
    if text in {"spatial", "in situ", "insitu", "visium", "imaging"}:
        return "spatial"
    if text in {"dissociated", "single-cell", "scrna-seq", "sc", "sn", "single-nucleus"}:
        return "dissociated"
    raise ValueError(
        f"Unknown modality {value!r}. Use 'dissociated' (single-cell/nucleus) or 'spatial'."
    )


CONTEXT_NORMALIZERS = {
    "species": normalize_species,
    "assay": normalize_assay,
    "modality": normalize_modality,
}


@dataclass(frozen=True)
class GeneVocab:
    """Token <-> id mapping for genes, special and context tokens.

    Build with :meth:`from_genes`; save/load as JSON with :meth:`save` / :meth:`load`.
    """

    token_to_id: Mapping[str, int]
    _id_to_token: tuple[str, ...] = field(repr=False, default=())

    def __post_init__(self) -> None:
        ids = sorted(self.token_to_id.values())
        if ids != list(range(len(ids))):
            raise ValueError("Vocabulary ids must be the contiguous range 0..N-1.")
        for position, token in enumerate(SPECIAL_TOKENS):
            if self.token_to_id.get(token) != position:
                raise ValueError(f"Special token {token} must have id {position}.")
        inverse = [""] * len(ids)
        for token, index in self.token_to_id.items():
            inverse[index] = token
        object.__setattr__(self, "_id_to_token", tuple(inverse))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_genes(
        cls,
        gene_ids: Iterable[str],
        context_values: Mapping[str, Iterable[str]] | None = None,
    ) -> GeneVocab:
        """Build a vocabulary from human Ensembl gene ids (sorted; duplicates rejected)."""
        genes = list(gene_ids)
        if len(set(genes)) != len(genes):
            raise ValueError("Gene ids must be unique to build a vocabulary.")
        bad = [g for g in genes if not _ENSEMBL_GENE.match(g)]
        if bad:
            raise ValueError(
                f"Vocabulary genes must be unversioned Ensembl gene ids; got e.g. {bad[:5]}."
            )
        values = {k: list(v) for k, v in DEFAULT_CONTEXT_VALUES.items()}
        for key, extra in (context_values or {}).items():
            values.setdefault(key, [])
            values[key] += [v for v in extra if v not in values[key]]
        tokens = list(SPECIAL_TOKENS)
        for key in CONTEXT_FIELDS:
            tokens += [context_token(key, value) for value in values.get(key, [])]
        tokens += sorted(genes)
        return cls({token: index for index, token in enumerate(tokens)})

    @classmethod
    def load(cls, path: str | Path) -> GeneVocab:
        """Read ``vocab.json`` (a JSON object token -> id)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"Cannot read vocabulary {path}: {error}. Is it a vocab.json?"
            ) from error
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object token -> id.")
        return cls({str(k): int(v) for k, v in data.items()})

    def to_json(self) -> str:
        """Canonical JSON text (ordered by id), the bytes that :attr:`sha256` hashes."""
        ordered = {token: index for index, token in enumerate(self._id_to_token)}
        return json.dumps(ordered, indent=0, ensure_ascii=True) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write ``vocab.json`` atomically."""
        return atomic_write_text(Path(path), self.to_json())

    # -- lookups --------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON: models record it to refuse a different vocabulary."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __len__(self) -> int:
        return len(self._id_to_token)

    def __contains__(self, token: object) -> bool:
        return token in self.token_to_id

    def __getitem__(self, token: str) -> int:
        return self.token_to_id[token]

    def id_to_token(self, index: int) -> str:
        return self._id_to_token[index]

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def mask_id(self) -> int:
        return 1

    @property
    def cls_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    @property
    def gene_ids(self) -> list[str]:
        """Ensembl ids of the gene tokens, in token-id order."""
        return [t for t in self._id_to_token if not t.startswith("<")]

    @property
    def first_gene_id(self) -> int:
        """Token id of the first gene (everything below is special or context)."""
        for index, token in enumerate(self._id_to_token):
            if not token.startswith("<"):
                return index
        return len(self)

    def context_id(self, field_name: str, value: str) -> int:
        """Token id of a context value; unknown values map to ``other`` (or ``<unk>``)."""
        for candidate in (value, "other"):
            token = context_token(field_name, candidate)
            if token in self.token_to_id:
                return self.token_to_id[token]
        return self.unk_id
