"""Offline gene-id resolution: any ``.var`` -> human Ensembl gene ids (GENCODE v44).

The tokenizer's vocabulary is human Ensembl gene ids without version. This module maps whatever
a dataset uses for genes onto those ids, with tables that ship inside the package (nothing is
looked up online), and reports what it did.

Accepted ids
------------
- Human Ensembl gene ids, with or without version (``ENSG00000141510.17`` -> ``ENSG00000141510``)
  or GENCODE's ``_PAR_Y`` suffix (``ENSG00000182378.14_PAR_Y`` -> ``ENSG00000182378``: the chrY
  copy of a pseudo-autosomal gene is the chrX gene, so both collapse onto one id). Only ids in
  GENCODE v44 are accepted; retired or unknown ``ENSG`` ids are reported unmapped (the vocabulary
  is built from v44, so nothing else could get a token).
- Human symbols, case-insensitively, against GENCODE v44. No aliases or previous symbols: the
  source tables hold none (Kang's old clone names like ``RP11-206L10.2`` are counted unmapped).
- Mouse symbols, case-insensitively (STARmap is lower-case), through the Ensembl 105 ortholog
  table, then the human symbol rule. Mouse Ensembl ids (``ENSMUSG``) cannot be mapped with these
  tables: when a mouse ``.var`` has both, the symbols are used (column scoring picks them).
- Names made unique by AnnData/R (``MATR3-1``, ``Rp1.1``): when such a name maps to nothing and
  its base (before the last ``-N``/``.N``) is also an input var, it resolves like the base, so
  the two are collapsed (summed) rather than one dropped.

Rules (also recorded in ``_data/genes/PROVENANCE.json``)
--------------------------------------------------------
- Duplicate symbols (343 v44 symbols name several ids, e.g. ``5S_rRNA``, ``MATR3``, PAR genes)
  resolve to the **smallest Ensembl id**: the older, established gene model, since v44 gave chrY
  PAR copies and re-annotated loci new, larger ids (``ASMT`` -> ``ENSG00000196433``, not
  ``ENSG00000292336``; ``MATR3`` -> protein-coding ``ENSG00000015479``, not
  ``ENSG00000280987``). The table has no assembly column to prefer the primary assembly with.
- Mouse one-to-many (1,272 mouse genes with several human candidates in v44): take the candidate
  whose symbol equals the mouse symbol upper-cased (303, e.g. ``Acot1`` -> ACOT1 of ACOT1/ACOT2);
  otherwise the gene is **ambiguous** and unmapped (969, e.g. ``Adh1`` -> ADH1A/B/C), counted in
  ``n_ambiguous``. Putting its counts on one arbitrary paralog, or splitting them, would invent
  expression the human model never saw for that gene; dropping it is the conservative choice.
- Human ortholog symbols missing from v44 (renamed after Ensembl 105) are dropped from the
  candidates first; a mouse gene left with none is not shipped.
- Mouse symbols not in the shipped table map to the human gene of the same symbol, if any
  (``n_symbol_fallback``): MGI and HGNC give homologs the same symbol, and the Ensembl 105 table
  lacks well-known one-to-one orthologs (``Ptma``, ``Hspd1``, ``Rpl7a``, ``Pcp4``; 415 of Moor et
  al.'s genes). Genes in the table follow its rules only (an ambiguous gene never falls back).
- Mouse many-to-one (several mouse genes -> one human gene) and any other duplicates after
  mapping are reported as *collapsed*: the tokenizer sums their counts.

Column detection
----------------
:func:`resolve_genes` scores ``var_names`` and every string column of ``.var`` by mapped count
and picks the best; ties prefer Ensembl ids (exact), then ``var_names``, then column order.
:func:`detect_species` decides from Ensembl prefixes when there are any (``ENSG`` vs
``ENSMUSG``), else from symbol case among values that hit a map (human symbols are upper-case;
mouse ``Actb`` or lower-case ones are not). Lower-cased human symbols would read as mouse: pass
``species="human"`` then.

Shipped files (``_data/genes``), rebuilt byte-identically by :func:`build_gene_maps` (from the
repository root; ``BUILD_COMMAND`` holds the same line)::

    python -c "from cellfoundry.genes import build_gene_maps; \\
               build_gene_maps('../shared/data/genes')"

This module imports numpy and pandas only (the tokenizer imports it and must stay torch-free).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cellfoundry._io import atomic_write_bytes, sha256_file

__all__ = [
    "GeneMaps",
    "GeneResolution",
    "build_gene_maps",
    "detect_species",
    "load_gene_maps",
    "resolve_genes",
]

logger = logging.getLogger(__name__)

HUMAN_SOURCE = "human_gencode_v44_ensembl_symbol.csv"
ORTHOLOG_SOURCE = "human_mouse_orthologs_ensembl105.csv"
HUMAN_FILE = "human_gencode_v44_genes.tsv.gz"
MOUSE_FILE = "mouse_to_human_ensembl105.tsv.gz"
PROVENANCE_FILE = "PROVENANCE.json"
FORMAT_VERSION = 1
BUILD_COMMAND = (
    'python -c "from cellfoundry.genes import build_gene_maps; '
    "build_gene_maps('../shared/data/genes')\""
)
RULES = {
    "ensembl_ids": "Version suffixes (.N) and GENCODE's _PAR_Y suffix are stripped; only ids "
    "present in GENCODE v44 are accepted, other ENSG ids are reported unmapped.",
    "human_symbols": "Matched case-insensitively against GENCODE v44 symbols; no aliases.",
    "duplicate_symbols": "A symbol naming several Ensembl ids resolves to the smallest id "
    "(older, established gene model; v44 PAR_Y copies and re-annotated loci got larger ids).",
    "genes_without_symbol": "GENCODE rows whose symbol equals the id are stored with an empty "
    "symbol; the id itself still maps.",
    "mouse_symbols": "Matched case-insensitively (upper-cased keys) against Ensembl 105 mouse "
    "ortholog symbols; case variants of one symbol are merged.",
    "mouse_missing_human": "Human ortholog symbols absent from GENCODE v44 are dropped from the "
    "candidates before any other rule; a mouse symbol left with none is not shipped (so the "
    "mouse_not_in_table rule applies to it).",
    "mouse_one_to_many": "Several human candidates: take the one whose symbol equals the mouse "
    "symbol upper-cased (rule 'same_symbol'); otherwise the mouse gene is 'ambiguous' and stays "
    "unmapped.",
    "mouse_not_in_table": "resolve_genes maps a mouse symbol absent from the shipped table to "
    "the human gene with the same symbol (case-insensitive), if any; counted as "
    "n_symbol_fallback.",
    "mouse_many_to_one": "Several mouse genes mapping to one human gene are kept; resolve_genes "
    "reports them as collapsed and the tokenizer sums them.",
    "mouse_ensembl_ids": "ENSMUSG ids cannot be mapped with these tables; use mouse symbols.",
}

_ENSEMBL_RE = r"^(ENS(?:MUS)?G\d{11})(?:\.\d+)?(?:_PAR_Y)?$"
_MAKE_UNIQUE_RE = r"^(.+)[-.]\d+$"
_N_EXAMPLES = 10
_SPECIES = ("human", "mouse")
_ACCEPTED = (
    "human Ensembl gene ids (ENSG..., version suffix optional, GENCODE v44), human gene symbols "
    "(GENCODE v44, any case), mouse gene symbols (any case, mapped to human orthologs via "
    "Ensembl 105); mouse Ensembl ids (ENSMUSG...) are not accepted"
)


# --------------------------------------------------------------------------------------------
# Shipped maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeneMaps:
    """The shipped lookup tables, indexed for vectorised lookups (all keys unique).

    Attributes
    ----------
    id_to_symbol : pandas.Series
        Index: every GENCODE v44 Ensembl gene id (sorted); value: its symbol ("" if none).
    symbol_to_id : pandas.Series
        Index: upper-cased human symbol; value: Ensembl id after the duplicate-symbol rule.
    mouse : pandas.DataFrame
        Index: upper-cased mouse symbol; columns ``ensembl_id`` ("" if ambiguous), ``rule``
        (``unique`` | ``same_symbol`` | ``ambiguous``), ``candidates`` (human symbols, ``|``).
    provenance : dict
        Contents of ``PROVENANCE.json``.
    """

    id_to_symbol: pd.Series
    symbol_to_id: pd.Series
    mouse: pd.DataFrame
    provenance: dict

    def symbols_of(self, ensembl_ids: Iterable[str]) -> np.ndarray:
        """Human symbol for each id (the id itself when it has none, "" when unknown)."""
        ids = _as_str_array(ensembl_ids)
        symbols = _lookup(self.id_to_symbol, ids)
        no_symbol = (symbols == "") & np.isin(ids, self.id_to_symbol.index)
        symbols[no_symbol] = ids[no_symbol]
        return symbols


def _data_dir() -> Path:
    return Path(__file__).resolve().parent / "_data" / "genes"


def _read_shipped(name: str) -> bytes:
    # importlib.resources works for wheels (even zipped) and editable installs alike.
    resource = resources.files(__name__.rpartition(".")[0]) / "_data" / "genes" / name
    try:
        return resource.read_bytes()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"Shipped gene map {name!r} is missing from the cellfoundry package; reinstall it or "
            f"rebuild the maps with: {BUILD_COMMAND}"
        ) from error


def _read_tsv_gz(data: bytes) -> pd.DataFrame:
    text = gzip.decompress(data).decode("utf-8")
    return pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)


@functools.lru_cache(maxsize=1)
def load_gene_maps() -> GeneMaps:
    """Read the shipped maps once per process (cached; about 0.1 s).

    Returns
    -------
    GeneMaps
        Indexed tables; treat them as read-only (they are shared by every caller).
    """
    human = _read_tsv_gz(_read_shipped(HUMAN_FILE))
    id_to_symbol = pd.Series(human["symbol"].to_numpy(), index=pd.Index(human["ensembl_id"]))
    named = human[human["symbol"] != ""]
    # Rows are sorted by id, so keeping the first row per symbol applies the smallest-id rule.
    keys = named["symbol"].str.upper()
    first = ~keys.duplicated(keep="first")
    symbol_to_id = pd.Series(
        named["ensembl_id"].to_numpy()[first.to_numpy()], index=pd.Index(keys[first])
    )
    mouse = _read_tsv_gz(_read_shipped(MOUSE_FILE)).set_index("mouse_symbol")
    provenance = json.loads(_read_shipped(PROVENANCE_FILE).decode("utf-8"))
    return GeneMaps(id_to_symbol, symbol_to_id, mouse, provenance)


# --------------------------------------------------------------------------------------------
# Building the shipped maps from ../shared/data/genes
# --------------------------------------------------------------------------------------------


def _read_source(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"Gene source table {path} not found; pass the folder holding it.")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)  # keeps symbols like "NA"
    if list(table.columns) != columns:
        raise ValueError(f"{path.name} must have columns {columns}, found {list(table.columns)}.")
    return table.apply(lambda column: column.str.strip())


def _human_table(source: pd.DataFrame) -> pd.DataFrame:
    ids = source["ensembl_id"].str.upper().str.extract(_ENSEMBL_RE, expand=False)
    bad = source.loc[ids.isna() | ~ids.str.startswith("ENSG", na=False), "ensembl_id"]
    if len(bad):
        raise ValueError(f"{HUMAN_SOURCE}: not human Ensembl gene ids: {bad.head(5).tolist()}.")
    table = pd.DataFrame({"ensembl_id": ids, "symbol": source["symbol"]})
    table.loc[table["symbol"] == table["ensembl_id"], "symbol"] = ""
    table = table.drop_duplicates().sort_values("ensembl_id", kind="stable")
    if table["ensembl_id"].duplicated().any():
        raise ValueError(f"{HUMAN_SOURCE}: an Ensembl id has several symbols; fix the source.")
    return table.reset_index(drop=True)


def _mouse_table(orthologs: pd.DataFrame, human: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    named = human[human["symbol"] != ""]
    keys = named["symbol"].str.upper()
    first = ~keys.duplicated()
    symbol_to_id = dict(zip(keys[first], named["ensembl_id"][first], strict=True))
    spelled = dict(zip(keys[first], named["symbol"][first], strict=True))  # GENCODE's case
    pairs = pd.DataFrame(
        {
            "mouse": orthologs["mouse_symbol"].str.upper(),
            "human": orthologs["human_symbol"].str.upper(),
        }
    ).drop_duplicates()
    known = pairs["human"].isin(symbol_to_id)
    groups: dict[str, list[str]] = {}  # plain dict: a pandas groupby loop is 10x slower here
    for mouse, candidate in sorted(zip(pairs["mouse"][known], pairs["human"][known], strict=True)):
        groups.setdefault(mouse, []).append(candidate)
    rows = []
    for mouse, candidates in groups.items():
        if len(candidates) == 1:
            chosen, rule = candidates[0], "unique"
        elif mouse in candidates:
            chosen, rule = mouse, "same_symbol"
        else:
            chosen, rule = "", "ambiguous"
        names = "|".join(spelled[c] for c in candidates)
        rows.append((mouse, symbol_to_id.get(chosen, ""), rule, names))
    table = pd.DataFrame(rows, columns=["mouse_symbol", "ensembl_id", "rule", "candidates"])
    mapped_ids = table.loc[table["ensembl_id"] != "", "ensembl_id"]
    stats = {
        "ortholog_pairs": int(len(pairs)),
        "pairs_dropped_human_symbol_not_in_v44": int((~known).sum()),
        "mouse_symbols_dropped_no_v44_ortholog": int(
            pairs["mouse"].nunique() - pairs.loc[known, "mouse"].nunique()
        ),
        "mouse_symbols_shipped": int(len(table)),
        **{f"rule_{k}": int(v) for k, v in table["rule"].value_counts().sort_index().items()},
        "human_ids_with_several_mouse_symbols": int((mapped_ids.value_counts() > 1).sum()),
        "mouse_symbols_onto_an_already_used_human_id": int(mapped_ids.duplicated().sum()),
    }
    return table, stats


def _gzip_bytes(data: bytes) -> bytes:
    # Written by hand because gzip.compress(mtime=0) lets zlib stamp the OS byte of the build
    # machine; this header (no name, mtime 0, OS 255 = unknown) is identical everywhere.
    header = b"\x1f\x8b\x08\x00" + struct.pack("<L", 0) + b"\x02\xff"
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    body = compressor.compress(data) + compressor.flush()
    return header + body + struct.pack("<LL", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def _tsv_bytes(table: pd.DataFrame) -> bytes:
    lines = ["\t".join(table.columns)]
    lines += ["\t".join(row) for row in table.itertuples(index=False, name=None)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _duplicate_symbol_stats(human: pd.DataFrame) -> dict:
    keys = human.loc[human["symbol"] != "", "symbol"].str.upper()
    counts = keys.value_counts()
    return {
        "symbols_with_several_ids": int((counts > 1).sum()),
        "ids_behind_duplicate_symbols": int(counts[counts > 1].sum()),
    }


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)  # mkstemp makes 0600 files; shipped data must be world-readable


def build_gene_maps(source_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Build the compact shipped maps from the two source CSVs, deterministically.

    Parameters
    ----------
    source_dir : str or Path
        Folder with ``human_gencode_v44_ensembl_symbol.csv`` and
        ``human_mouse_orthologs_ensembl105.csv`` (``../shared/data/genes``).
    out_dir : str or Path, optional
        Destination; default the package's ``_data/genes`` (what ships in the wheel).

    Returns
    -------
    dict
        The provenance written to ``PROVENANCE.json``: sources (name, sha256, rows), build
        command, rules, statistics and each output's sha256. No timestamps or paths, so
        re-running gives byte-identical files. Every file is written atomically.
    """
    source_dir = Path(source_dir)
    out_dir = Path(out_dir) if out_dir is not None else _data_dir()
    human_src = _read_source(source_dir / HUMAN_SOURCE, ["ensembl_id", "symbol"])
    ortho_src = _read_source(source_dir / ORTHOLOG_SOURCE, ["human_symbol", "mouse_symbol"])
    human = _human_table(human_src)
    mouse, mouse_stats = _mouse_table(ortho_src, human)
    outputs = {}
    for name, table in ((HUMAN_FILE, human), (MOUSE_FILE, mouse)):
        raw = _tsv_bytes(table)
        data = _gzip_bytes(raw)
        _write(out_dir / name, data)
        outputs[name] = {
            "rows": int(len(table)),
            "columns": list(table.columns),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "uncompressed_sha256": hashlib.sha256(raw).hexdigest(),
        }
    provenance = {
        "format_version": FORMAT_VERSION,
        "builder": "cellfoundry.genes.build_gene_maps",
        "build_command": BUILD_COMMAND,
        "sources": [
            {
                "file": HUMAN_SOURCE,
                "sha256": sha256_file(source_dir / HUMAN_SOURCE),
                "rows": int(len(human_src)),
                "origin": "GENCODE v44 gene id -> name "
                "(celltypist 1.7.1 data/samples/GENCODEv44_Gene_id2name.csv, MIT)",
            },
            {
                "file": ORTHOLOG_SOURCE,
                "sha256": sha256_file(source_dir / ORTHOLOG_SOURCE),
                "rows": int(len(ortho_src)),
                "origin": "Ensembl 105 human-mouse orthologs "
                "(celltypist 1.7.1 data/samples/Ensembl105_Human2Mouse_Genes.csv, MIT)",
            },
        ],
        "rules": RULES,
        "statistics": {
            "human_ids": int(len(human)),
            "human_ids_without_symbol": int((human["symbol"] == "").sum()),
            **_duplicate_symbol_stats(human),
            **mouse_stats,
        },
        "outputs": outputs,
    }
    text = json.dumps(provenance, indent=2, ensure_ascii=True) + "\n"
    _write(out_dir / PROVENANCE_FILE, text.encode("utf-8"))
    load_gene_maps.cache_clear()
    logger.info("Gene maps written to %s: %s", out_dir, {k: v["rows"] for k, v in outputs.items()})
    return provenance


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclass
class GeneResolution:
    """How the genes of one ``.var`` map onto human Ensembl ids (G = number of input vars).

    Attributes
    ----------
    ensembl_ids : numpy.ndarray
        Shape (G,), object array of str: human Ensembl id without version per input var, ""
        where unmapped. Several vars may share an id (``n_collapsed``); the tokenizer sums them.
    source : str
        ``"var_names"`` or the ``.var`` column the ids came from.
    id_kind : str
        ``"ensembl"`` or ``"symbol"`` (what most values of ``source`` look like).
    species : str
        ``"human"`` or ``"mouse"``.
    n_input, n_mapped, n_unmapped : int
        Input vars, vars with an id, vars without (``n_mapped + n_unmapped == n_input``).
    n_collapsed : int
        Mapped vars whose id is already used by an earlier var (``n_mapped - n_unique_ids``).
    unmapped_examples : list of str
        Up to 10 unmapped input values, in input order.
    collapsed_examples : list of (str, str)
        Up to 10 ``(input value, human Ensembl id)`` pairs for collapsed vars.
    n_ambiguous : int
        Mouse genes left unmapped by the one-to-many rule (included in ``n_unmapped``).
    ambiguous_examples : list of (str, str)
        Up to 10 ``(mouse symbol, "HUMAN1|HUMAN2|...")`` pairs.
    n_symbol_fallback : int
        Mouse genes absent from the ortholog table, mapped by their identical human symbol
        (included in ``n_mapped``).
    candidate_scores : dict
        Mapped count per source that was scored (why ``source`` was chosen).
    """

    ensembl_ids: np.ndarray
    source: str
    id_kind: str
    species: str
    n_input: int
    n_mapped: int
    n_unmapped: int
    n_collapsed: int
    unmapped_examples: list[str] = field(default_factory=list)
    collapsed_examples: list[tuple[str, str]] = field(default_factory=list)
    n_ambiguous: int = 0
    ambiguous_examples: list[tuple[str, str]] = field(default_factory=list)
    n_symbol_fallback: int = 0
    candidate_scores: dict[str, int] = field(default_factory=dict)

    @property
    def n_unique_ids(self) -> int:
        """Distinct human ids the input maps to."""
        return self.n_mapped - self.n_collapsed

    def to_dict(self) -> dict:
        """JSON-ready report (everything except the per-var ``ensembl_ids`` array)."""
        return {
            "source": self.source,
            "id_kind": self.id_kind,
            "species": self.species,
            "n_input": self.n_input,
            "n_mapped": self.n_mapped,
            "n_unmapped": self.n_unmapped,
            "n_collapsed": self.n_collapsed,
            "n_unique_ids": self.n_unique_ids,
            "n_ambiguous": self.n_ambiguous,
            "n_symbol_fallback": self.n_symbol_fallback,
            "unmapped_examples": list(self.unmapped_examples),
            "collapsed_examples": [list(pair) for pair in self.collapsed_examples],
            "ambiguous_examples": [list(pair) for pair in self.ambiguous_examples],
            "candidate_scores": dict(self.candidate_scores),
        }

    def summary(self) -> str:
        """One paragraph for logs and the CLI."""
        fraction = self.n_mapped / self.n_input if self.n_input else 0.0
        text = (
            f"Genes: {self.n_input:,} {self.species} vars read from {self.source} "
            f"({'Ensembl ids' if self.id_kind == 'ensembl' else 'symbols'}); "
            f"{self.n_mapped:,} mapped ({fraction:.1%}) to "
            f"{self.n_unique_ids:,} human Ensembl ids (GENCODE v44)"
        )
        if self.n_symbol_fallback:
            text += (
                f" ({_genes(self.n_symbol_fallback)} absent from the ortholog table "
                "mapped by identical symbol)"
            )
        text += f", {self.n_unmapped:,} unmapped and dropped"
        if self.unmapped_examples:
            text += f" (e.g. {', '.join(self.unmapped_examples[:5])})"
        if self.n_ambiguous:
            pairs = "; ".join(f"{m} -> {h}" for m, h in self.ambiguous_examples[:3])
            text += (
                f", of which {_genes(self.n_ambiguous)} with several human orthologs "
                f"and none of the same name (e.g. {pairs})"
            )
        text += f"; {self.n_collapsed:,} collapsed onto an id used by another var (summed)"
        if self.collapsed_examples:
            pairs = ", ".join(f"{name} -> {gid}" for name, gid in self.collapsed_examples[:3])
            text += f" (e.g. {pairs})"
        return text + "."


def _genes(n: int) -> str:
    return f"{n:,} mouse gene" + ("" if n == 1 else "s")


def _as_str_array(values: Iterable) -> np.ndarray:
    """Object array of stripped str; None/NaN -> ""."""
    series = pd.Series(values if isinstance(values, pd.Index | pd.Series) else list(values))
    series = series.astype(object).where(series.notna(), "")
    return series.astype(str).str.strip().to_numpy(dtype=object)


def _lookup(table: pd.Series, keys: np.ndarray) -> np.ndarray:
    positions = table.index.get_indexer(keys)
    out = np.full(len(keys), "", dtype=object)
    hit = positions >= 0
    out[hit] = table.to_numpy()[positions[hit]]
    return out


def _contains(index: pd.Index, keys: np.ndarray) -> np.ndarray:
    """Hash lookup of each key in a unique index (np.isin would sort object arrays)."""
    return index.get_indexer(keys) >= 0


def _ensembl_bases(upper: np.ndarray) -> np.ndarray:
    """Unversioned Ensembl gene id per value ("" where the value is not one)."""
    out = np.full(len(upper), "", dtype=object)
    # the regex only where it can match: symbols (most inputs) never start with "ENS"
    candidates = np.flatnonzero(np.char.startswith(upper.astype(str), "ENS")) if len(upper) else []
    if len(candidates):
        bases = pd.Series(upper[candidates], dtype=object).str.extract(_ENSEMBL_RE, expand=False)
        out[candidates] = bases.fillna("").to_numpy(dtype=object)
    return out


def _map_values(upper: np.ndarray, species: str, maps: GeneMaps) -> tuple[np.ndarray, np.ndarray]:
    """(ids, how) for upper-cased values of one source; ``how`` names the rule per value:
    "" (unmapped), "ensembl", "symbol", "ortholog", "ambiguous" or "symbol_fallback"."""
    bases = _ensembl_bases(upper)
    ids = np.full(len(upper), "", dtype=object)
    how = np.full(len(upper), "", dtype=object)
    human_id = np.char.startswith(bases.astype(str), "ENSG") & _contains(
        maps.id_to_symbol.index, bases
    )
    ids[human_id], how[human_id] = bases[human_id], "ensembl"
    symbols = np.flatnonzero(bases == "")
    if species == "human":
        found = _lookup(maps.symbol_to_id, upper[symbols])
        ids[symbols], how[symbols[found != ""]] = found, "symbol"
        return ids, how
    positions = maps.mouse.index.get_indexer(upper[symbols])
    in_table = symbols[positions >= 0]
    rows = positions[positions >= 0]
    ids[in_table] = maps.mouse["ensembl_id"].to_numpy()[rows]
    ambiguous = maps.mouse["rule"].to_numpy()[rows] == "ambiguous"
    how[in_table] = np.where(ambiguous, "ambiguous", "ortholog")
    # Mouse symbols absent from the ortholog table: MGI and HGNC give homologs the same symbol,
    # and the Ensembl 105 table lacks well-known one-to-one orthologs (Ptma, Hspd1, Pcp4).
    absent = symbols[positions < 0]
    found = _lookup(maps.symbol_to_id, upper[absent])
    ids[absent], how[absent[found != ""]] = found, "symbol_fallback"
    return ids, how


def _resolve_source(values: np.ndarray, species: str, maps: GeneMaps) -> dict:
    upper = np.array([v.upper() for v in values], dtype=object)
    ids, how = _map_values(upper, species, maps)
    # Names made unique by AnnData ("-1") or R ("."): resolve like the base name when that base
    # is itself an input var and the full name maps to nothing.
    unmapped = np.flatnonzero(how == "")  # only these can need the make-unique retry
    base = pd.Series(upper[unmapped], dtype=object).str.extract(_MAKE_UNIQUE_RE, expand=False)
    hit = base.notna().to_numpy() & base.isin(set(upper)).to_numpy()
    retry = unmapped[hit]
    if retry.size:
        ids[retry], how[retry] = _map_values(base[hit].to_numpy(dtype=object), species, maps)
    ids[how == "ambiguous"] = ""
    n_ensembl = int(np.count_nonzero(_ensembl_bases(upper) != ""))
    n_present = int(np.count_nonzero(upper != ""))
    kind = "ensembl" if n_present and n_ensembl * 2 > n_present else "symbol"
    return {"ids": ids, "how": how, "kind": kind, "n_mapped": int((ids != "").sum())}


def detect_species(ids: Iterable[str]) -> str:
    """Guess ``"human"`` or ``"mouse"`` from gene ids or symbols.

    Ensembl prefixes decide when any value is an Ensembl gene id (majority of ``ENSG`` vs
    ``ENSMUSG``; ties -> human). Otherwise, among values that hit the human or mouse symbol map
    case-insensitively (so barcodes and other junk do not vote), a majority containing lower-case
    letters means mouse (``Actb``, ``mt-Nd1``, STARmap's ``acss1``), else human. With no
    evidence at all the answer is ``"human"`` (the vocabulary's species).
    """
    values = _as_str_array(ids)
    upper = np.array([v.upper() for v in values], dtype=object)
    bases = _ensembl_bases(upper).astype(str)
    n_mouse = int(np.count_nonzero(np.char.startswith(bases, "ENSMUSG")))
    n_human = int(np.count_nonzero(np.char.startswith(bases, "ENSG")))
    if n_mouse + n_human:
        return "mouse" if n_mouse > n_human else "human"
    maps = load_gene_maps()
    known = _contains(maps.symbol_to_id.index, upper) | _contains(maps.mouse.index, upper)
    if not known.any():
        logger.debug("detect_species: no Ensembl id or known symbol among the values; human.")
        return "human"
    has_lower = pd.Series(values[known], dtype=object).str.contains("[a-z]", regex=True)
    return "mouse" if has_lower.mean() > 0.5 else "human"


def _candidate_sources(var: pd.DataFrame, gene_column: str | None) -> dict[str, np.ndarray]:
    if gene_column is not None:
        if gene_column == "var_names":
            return {"var_names": _as_str_array(var.index)}
        if gene_column not in var.columns:
            raise ValueError(
                f"gene_column={gene_column!r} is not a column of .var; use 'var_names' or one "
                f"of {list(map(str, var.columns))}."
            )
        return {str(gene_column): _as_str_array(var[gene_column])}
    sources = {"var_names": _as_str_array(var.index)}
    for name in var.columns:
        column = var[name]
        dtype = column.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            dtype = dtype.categories.dtype
        if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
            sources[str(name)] = _as_str_array(column)
    return sources


def _examples(values: np.ndarray, limit: int = 5) -> list[str]:
    present = pd.unique(values[values != ""])
    return [str(v) for v in present[:limit]]


def _nothing_maps_error(sources: dict[str, np.ndarray], species: str) -> ValueError:
    seen = "; ".join(f"{name}: {_examples(values)}" for name, values in sources.items())
    other = "mouse" if species == "human" else "human"
    return ValueError(
        f"No gene could be mapped to a human Ensembl id (species={species!r}, tried "
        f"{', '.join(sources)}). Examples seen: {seen}. Accepted: {_ACCEPTED}. Fix: put such ids "
        f"in var_names or a .var column (pass gene_column=... to choose it), or pass "
        f"species={other!r} if the species was misdetected."
    )


def _make_resolution(values, var_names, found, source, species, scores) -> GeneResolution:
    ids, ambiguous = found["ids"], found["how"] == "ambiguous"
    # An empty id cell says nothing; name the var instead.
    labels = np.where(values == "", var_names + " (no id)", values)
    mapped = ids != ""
    collapsed = np.zeros(len(ids), dtype=bool)
    collapsed[mapped] = pd.Series(ids[mapped], dtype=object).duplicated(keep="first").to_numpy()
    unmapped_idx = np.flatnonzero(~mapped)[:_N_EXAMPLES]
    collapsed_idx = np.flatnonzero(collapsed)[:_N_EXAMPLES]
    ambiguous_idx = np.flatnonzero(ambiguous)[:_N_EXAMPLES]
    candidates = load_gene_maps().mouse["candidates"]
    return GeneResolution(
        ensembl_ids=ids,
        source=source,
        id_kind=found["kind"],
        species=species,
        n_input=len(ids),
        n_mapped=int(mapped.sum()),
        n_unmapped=int((~mapped).sum()),
        n_collapsed=int(collapsed.sum()),
        unmapped_examples=[str(labels[i]) for i in unmapped_idx],
        collapsed_examples=[(str(values[i]), str(ids[i])) for i in collapsed_idx],
        n_ambiguous=int(ambiguous.sum()),
        n_symbol_fallback=int((found["how"] == "symbol_fallback").sum()),
        ambiguous_examples=[
            (str(values[i]), str(candidates.get(values[i].upper(), ""))) for i in ambiguous_idx
        ],
        candidate_scores=scores,
    )


def resolve_genes(
    var: pd.DataFrame, species: str = "auto", gene_column: str | None = None
) -> GeneResolution:
    """Map each var of an AnnData ``.var`` to a human Ensembl gene id and report it.

    Parameters
    ----------
    var : pandas.DataFrame
        ``adata.var`` (index = ``var_names``); backed AnnData works (``.var`` is in memory).
    species : {"auto", "human", "mouse"}
        ``"auto"`` runs :func:`detect_species` over ``var_names`` and the string columns.
    gene_column : str, optional
        Force the source: ``"var_names"`` or a column name. Default: score ``var_names`` and every
        string column by mapped count and take the best (ties: Ensembl ids, then ``var_names``).

    Returns
    -------
    GeneResolution
        Per-var ids (shape (G,)) and the report, also logged at INFO.

    Raises
    ------
    ValueError
        Bad ``species``/``gene_column``, or nothing maps (the message shows example values per
        source and the accepted id kinds).
    """
    if not isinstance(var, pd.DataFrame):
        raise TypeError(f"var must be a pandas DataFrame (adata.var), not {type(var).__name__}.")
    if species not in ("auto", *_SPECIES):
        raise ValueError(f"species must be 'auto', 'human' or 'mouse', not {species!r}.")
    sources = _candidate_sources(var, gene_column)
    if species == "auto":
        species = detect_species(np.concatenate(list(sources.values())))
    maps = load_gene_maps()
    found = {name: _resolve_source(values, species, maps) for name, values in sources.items()}
    order = list(found)
    best = max(
        order,
        key=lambda n: (found[n]["n_mapped"], found[n]["kind"] == "ensembl", -order.index(n)),
    )
    if found[best]["n_mapped"] == 0:
        raise _nothing_maps_error(sources, species)
    scores = {name: result["n_mapped"] for name, result in found.items()}
    var_names = _as_str_array(var.index)
    resolution = _make_resolution(sources[best], var_names, found[best], best, species, scores)
    logger.info(resolution.summary())
    if resolution.n_mapped < 0.5 * resolution.n_input:
        logger.warning(
            "Only %d of %d genes mapped; check species=%r and the id source %r.",
            resolution.n_mapped,
            resolution.n_input,
            species,
            best,
        )
    return resolution
