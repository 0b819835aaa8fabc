"""Train / validation / test splits of labelled cells, saved as JSON files.

A benchmark figure only means something on a split that is fixed, written down and shared by
every method compared (DESIGN 7, 9). :func:`make_split` draws one of three kinds:

- ``"random"``: stratified by label, ``test_fraction`` of the labelled cells to test and
  ``validation_fraction`` of the rest to validation;
- ``"holdout"``: every labelled cell of the held-out batch(es) (slice, donor, section) is
  test, so the score measures transfer to an unseen batch rather than interpolation;
- ``"few_shot"``: the random test part, then only ``n_per_class`` training cells per label.

:class:`LabelSplit` holds row positions into the AnnData (``adata[split.train]``), not obs
names, so a split fits every view of the same file; ``n_obs`` and an obs-name checksum guard
against applying it to another file. numpy / pandas / scikit-learn only: no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellfoundry._io import atomic_write_text

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "holdout", "few_shot")
PARTS = ("train", "validation", "test")
FORMAT = "cellfoundry-label-split"
FORMAT_VERSION = 1
# Labels that look like a missing-value marker: only warned about (a real label could be
# called "NA"); they are dropped only when named in ``drop_labels``.
_MISSING_LOOKING = {"na", "n/a", "nan", "none", "unknown", "unlabelled", "unlabeled", "unassigned"}


def _plain(value: Any) -> Any:
    """numpy scalars / arrays inside ``details`` -> JSON types (a split file is plain JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def obs_names_sha256(obs_names: Sequence[Any]) -> str:
    """Checksum of the row names, so a saved split can be checked against its AnnData."""
    return hashlib.sha256("\n".join(map(str, obs_names)).encode("utf-8")).hexdigest()


def _index_array(values: Any, part: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"LabelSplit.{part} must be a 1-D array of integer row positions, got dtype "
            f"{array.dtype} and shape {array.shape}; pass positions such as np.flatnonzero(mask)."
        )
    array = np.sort(array.astype(np.int64), kind="stable")
    array.flags.writeable = False  # the dataclass is frozen: so are its arrays
    return array


@dataclass(frozen=True, eq=False)
class LabelSplit:
    """Row positions of the train, validation and test cells of one AnnData.

    Parameters
    ----------
    train, validation, test : numpy.ndarray
        Sorted, disjoint int64 row positions (``adata[split.test]``). Cells without a usable
        label are in no part.
    strategy : str
        ``"random"``, ``"holdout"`` or ``"few_shot"`` (how the split was drawn).
    details : dict
        JSON-able facts: seed, fractions, held-out batches, ``n_per_class``, label counts per
        part, dropped cells, unseen test labels; what a report needs to describe the split.
    n_obs : int, optional
        Rows of the AnnData the positions index; checked on load so that a split is not
        silently applied to another file.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    strategy: str
    details: dict = field(default_factory=dict)
    n_obs: int | None = None

    def __post_init__(self) -> None:
        for part in PARTS:
            object.__setattr__(self, part, _index_array(getattr(self, part), part))
        object.__setattr__(self, "details", _plain(dict(self.details)))
        self._check()

    def _check(self) -> None:
        """Unique, non-negative, in range and disjoint; else a ValueError naming the part."""
        for part in PARTS:
            rows = getattr(self, part)
            if rows.size and rows[0] < 0:
                raise ValueError(f"{part} holds negative row position {int(rows[0])}.")
            if rows.size > 1 and np.any(rows[1:] == rows[:-1]):
                raise ValueError(f"{part} lists a row more than once; each cell may appear once.")
            if self.n_obs is not None and rows.size and rows[-1] >= self.n_obs:
                raise ValueError(
                    f"{part} holds row position {int(rows[-1])}, but the data has only "
                    f"{self.n_obs} rows; the split was made for other data: recreate it."
                )
        for i, first in enumerate(PARTS):
            for second in PARTS[i + 1 :]:
                shared = np.intersect1d(getattr(self, first), getattr(self, second))
                if shared.size:
                    raise ValueError(
                        f"{first} and {second} share {shared.size} row(s) (e.g. "
                        f"{shared[:5].tolist()}); parts must be disjoint: recreate the split "
                        "with make_split."
                    )

    @property
    def parts(self) -> dict[str, np.ndarray]:
        """``{"train": ..., "validation": ..., "test": ...}``."""
        return {part: getattr(self, part) for part in PARTS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSplit):
            return NotImplemented
        return (
            self.strategy == other.strategy
            and self.n_obs == other.n_obs
            and self.details == other.details
            and all(np.array_equal(getattr(self, p), getattr(other, p)) for p in PARTS)
        )

    __hash__ = None  # mutable-looking arrays inside: not hashable

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary: format tag, strategy, ``n_obs``, the three parts, details."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "n_obs": self.n_obs,
            **{part: getattr(self, part).tolist() for part in PARTS},
            "details": self.details,
        }

    def save(self, path: str | Path) -> Path:
        """Write the split as JSON, atomically (a reader never sees half a file)."""
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(
        cls,
        path: str | Path,
        n_obs: int | None = None,
        obs_names: Sequence[Any] | None = None,
    ) -> LabelSplit:
        """Read a split written by :meth:`save` and check it fits the data.

        Parameters
        ----------
        path : str or Path
            The JSON file.
        n_obs : int, optional
            Rows of the AnnData the split will index; must equal the saved ``n_obs``.
        obs_names : sequence, optional
            The AnnData's ``obs_names``; checked against the saved checksum, when there is one.

        Raises
        ------
        ValueError
            Unreadable or foreign file, overlapping parts, positions out of range, or data of
            another size / row order than the split was made for.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read split file {path}: {error}") from error
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a cellfoundry split file (no format {FORMAT!r}); write splits "
                "with make_split(...).save(path)."
            )
        missing = [key for key in (*PARTS, "strategy") if key not in raw]
        if missing:
            raise ValueError(f"Split file {path} lacks {missing}; recreate it with make_split.")
        saved_n_obs = raw.get("n_obs")
        if n_obs is not None and saved_n_obs is not None and int(saved_n_obs) != int(n_obs):
            raise ValueError(
                f"Split file {path} was made for {saved_n_obs} cells but the data has {n_obs}; "
                "use the split with the AnnData it was made from, or make a new one."
            )
        try:
            split = cls(
                train=raw["train"],
                validation=raw["validation"],
                test=raw["test"],
                strategy=str(raw["strategy"]),
                details=raw.get("details") or {},
                n_obs=n_obs if saved_n_obs is None else int(saved_n_obs),
            )
        except ValueError as error:
            raise ValueError(f"Split file {path}: {error}") from error
        saved_hash = split.details.get("obs_names_sha256")
        if obs_names is not None and saved_hash and obs_names_sha256(obs_names) != saved_hash:
            raise ValueError(
                f"Split file {path} was made for other obs_names (checksum differs): the cells "
                "are another file's or in another order; use the original AnnData or make a "
                "new split."
            )
        return split


# -- drawing ---------------------------------------------------------------------------------
def _draw(
    positions: np.ndarray, labels: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split ``positions`` into (kept, drawn), the drawn part ``fraction`` of them.

    Stratified by label with scikit-learn's ``train_test_split`` where it can be (every label
    with at least 2 cells, and at least one drawn cell per label); unstratified with a warning
    otherwise. Returns the sorted parts and whether the draw was stratified.
    """
    from sklearn.model_selection import train_test_split

    empty = np.empty(0, dtype=np.int64)
    if fraction == 0 or positions.size == 0:
        return positions, empty, True
    names, counts = np.unique(labels, return_counts=True)
    stratify: np.ndarray | None = labels
    if np.any(counts < 2):
        logger.warning(
            "%s draw is not stratified: label(s) %s have fewer than 2 cells; consider "
            "drop_labels=[...] for them.",
            what,
            names[counts < 2].tolist(),
        )
        stratify = None
    try:
        try:
            kept, drawn = train_test_split(
                positions, test_size=fraction, stratify=stratify, random_state=seed
            )
        except ValueError as error:
            if stratify is None:
                raise
            # scikit-learn refuses a stratified draw smaller than the number of labels
            logger.warning("%s draw is not stratified (%s).", what, error)
            stratify = None
            kept, drawn = train_test_split(
                positions, test_size=fraction, stratify=None, random_state=seed
            )
    except ValueError as error:
        raise ValueError(
            f"Cannot draw the {what} part ({fraction} of {positions.size} cells): {error}. "
            "Use more cells or another fraction."
        ) from error
    return np.sort(kept), np.sort(drawn), stratify is not None


def _few_shot(
    pool: np.ndarray, labels: np.ndarray, n_per_class: int, n_validation: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """First ``n_per_class`` cells of a seeded permutation per label -> train, next -> validation.

    Hand-written rather than scikit-learn: a fixed count per class is not a fraction. Labels are
    visited in sorted order and each permutation depends only on the label's cells, so for one
    seed the 10-shot training cells are among the 50-shot ones (nested few-shot sets).
    """
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(labels):
        order = rng.permutation(pool[labels == label])
        train.append(order[:n_per_class])
        validation.append(order[n_per_class : n_per_class + n_validation])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


# -- make_split ------------------------------------------------------------------------------
def _check_arguments(
    obs: pd.DataFrame,
    label_key: str,
    strategy: str,
    batch_key: str | None,
    holdout: Sequence[str] | None,
    n_per_class: int | None,
    validation_fraction: float,
    test_fraction: float,
) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; use one of {list(STRATEGIES)}.")
    if label_key not in obs.columns:
        raise ValueError(
            f"label_key={label_key!r} is not an obs column; choose one of {list(obs.columns)}."
        )
    if not 0 <= validation_fraction < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction} is out of range; use 0 <= value < 1."
        )
    if strategy != "holdout" and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} is out of range; use 0 < value < 1.")
    if strategy == "holdout":
        if batch_key is None or batch_key not in obs.columns:
            raise ValueError(
                f"strategy='holdout' needs batch_key naming an obs column (got {batch_key!r}); "
                f"choose one of {list(obs.columns)}."
            )
    elif holdout is not None:
        raise ValueError(f"holdout={holdout!r} only applies to strategy='holdout'.")
    if strategy == "few_shot":
        if n_per_class is None or int(n_per_class) < 1:
            raise ValueError(
                f"strategy='few_shot' needs n_per_class >= 1 (got {n_per_class!r}); e.g. "
                "n_per_class=10 or 50."
            )
    elif n_per_class is not None:
        raise ValueError(f"n_per_class={n_per_class} only applies to strategy='few_shot'.")


def _usable_labels(
    obs: pd.DataFrame, label_key: str, drop_labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Label strings and the positions of cells with a usable label (not NaN, empty, dropped)."""
    column = obs[label_key]
    labels = column.astype(str).to_numpy(dtype=object)
    missing = column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
    dropped = np.isin(labels, [str(label) for label in drop_labels]) & ~missing
    keep = ~missing & ~dropped
    names = np.unique(labels[keep].astype(str))
    suspicious = [name for name in names.tolist() if name.strip().lower() in _MISSING_LOOKING]
    if suspicious:
        logger.warning(
            "Label(s) %s in obs[%r] look like missing-value markers but are kept as classes; "
            "pass drop_labels=%s if they mean 'no label'.",
            suspicious,
            label_key,
            suspicious,
        )
    info = {
        "n_missing_label": int(missing.sum()),
        "n_dropped_label": int(dropped.sum()),
        "drop_labels": [str(label) for label in drop_labels],
    }
    return labels, np.flatnonzero(keep).astype(np.int64), info


def _holdout_test(
    obs: pd.DataFrame, batch_key: str, holdout: Sequence[str] | str | None, labelled: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Labelled cells whose batch is held out (the last batch in sorted order by default)."""
    batches = obs[batch_key].astype(str).to_numpy(dtype=object)
    present = sorted(set(batches.tolist()))
    if holdout is None:
        values = [present[-1]]
    else:
        values = [holdout] if isinstance(holdout, str) else [str(v) for v in holdout]
    absent = [v for v in values if v not in present]
    if absent or not values:
        raise ValueError(
            f"holdout value(s) {absent or values} not found in obs[{batch_key!r}]; present "
            f"values: {present}."
        )
    if len(set(values)) == len(present):
        raise ValueError(
            f"holdout={values} holds out every batch of obs[{batch_key!r}]: nothing is left to "
            "train on; hold out fewer batches."
        )
    return labelled[np.isin(batches[labelled], values)], values


def _label_counts(labels: np.ndarray, rows: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(labels[rows].astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _check_training_labels(
    labels: np.ndarray,
    parts: dict[str, np.ndarray],
    strategy: str,
    n_per_class: int | None,
    allow_unseen_test_labels: bool,
) -> list[str]:
    """Raise on labels a classifier cannot learn; return unseen test labels (when allowed)."""
    train_counts = _label_counts(labels, parts["train"])
    single = sorted(name for name, count in train_counts.items() if count == 1)
    if single and not (strategy == "few_shot" and n_per_class == 1):
        raise ValueError(
            f"Label(s) {single} have exactly one cell in the training part: too few to learn "
            f"or to stratify; pass drop_labels={single} or use another split."
        )
    unseen_validation = sorted(set(_label_counts(labels, parts["validation"])) - set(train_counts))
    if unseen_validation:
        raise ValueError(
            f"Validation label(s) {unseen_validation} never occur in the training part; pass "
            f"drop_labels={unseen_validation} (too few cells) or a smaller validation_fraction."
        )
    unseen = sorted(set(_label_counts(labels, parts["test"])) - set(train_counts))
    if unseen and not allow_unseen_test_labels:
        raise ValueError(
            f"Test label(s) {unseen} never occur in the training part, so no classifier can "
            f"predict them; pass drop_labels={unseen}, hold out other batches, or "
            "allow_unseen_test_labels=True to score them anyway (always wrong)."
        )
    if unseen:
        logger.warning(
            "Test label(s) %s never occur in training: they stay in test and are always "
            "mispredicted (allow_unseen_test_labels=True).",
            unseen,
        )
    return unseen


def make_split(
    obs: pd.DataFrame,
    label_key: str,
    strategy: str,
    *,
    batch_key: str | None = None,
    holdout: Sequence[str] | None = None,
    n_per_class: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    drop_labels: Sequence[str] = (),
    allow_unseen_test_labels: bool = False,
) -> LabelSplit:
    """Draw a seeded train / validation / test split of the labelled cells.

    Parameters
    ----------
    obs : pandas.DataFrame
        ``adata.obs``; the split holds row positions into it.
    label_key : str
        Column with the cell labels. Cells whose label is NaN, empty or in ``drop_labels``
        are in no part.
    strategy : {"random", "holdout", "few_shot"}
        ``random``: stratified ``test_fraction`` to test, then ``validation_fraction`` of the
        rest to validation. ``holdout``: every labelled cell whose ``obs[batch_key]`` is in
        ``holdout`` (default: the last batch value in sorted order) is test, a stratified
        ``validation_fraction`` of the other cells is validation; tests transfer to an unseen
        batch / donor / section. ``few_shot``: test as ``random``, then ``n_per_class`` training
        cells per label (all of a label's remaining cells when it has fewer) and, unless
        ``validation_fraction`` is 0, up to ``n_per_class`` unused cells per label as
        validation: a few-shot user would not have a large labelled validation set either.
    batch_key, holdout : str, sequence of str, optional
        For ``holdout``: the batch column and the held-out values (compared as strings).
    n_per_class : int, optional
        For ``few_shot``: training cells per label (e.g. 10 or 50).
    validation_fraction, test_fraction : float
        Fractions in [0, 1) and (0, 1); ``test_fraction`` is unused by ``holdout``.
    seed : int
        The only randomness; the same inputs and seed give the same split.
    drop_labels : sequence of str
        Labels that mean "no label" (STARmap's ``"NA"``) or are too rare to learn.
    allow_unseen_test_labels : bool
        Keep test cells whose label never occurs in training (possible with ``holdout``),
        with a warning and ``details["unseen_test_labels"]``, instead of raising.

    Returns
    -------
    LabelSplit
        Sorted, disjoint row positions; ``details`` records everything above plus label counts
        per part.

    Raises
    ------
    ValueError
        Missing column, unknown holdout value, fractions out of range, ``n_per_class`` missing
        for ``few_shot``, a label with a single training cell, unseen test labels; each message
        names the value and the fix.
    """
    _check_arguments(
        obs,
        label_key,
        strategy,
        batch_key,
        holdout,
        n_per_class,
        validation_fraction,
        test_fraction,
    )
    labels, labelled, dropped = _usable_labels(obs, label_key, drop_labels)
    if labelled.size == 0:
        raise ValueError(
            f"No cell of obs[{label_key!r}] has a usable label (all NaN, empty or dropped); "
            "check label_key and drop_labels."
        )
    details: dict[str, Any] = {
        "label_key": label_key,
        "seed": int(seed),
        "validation_fraction": float(validation_fraction),
        "n_labelled": int(labelled.size),
        **dropped,
        "obs_names_sha256": obs_names_sha256(obs.index),
    }
    if strategy == "holdout":
        test, values = _holdout_test(obs, batch_key, holdout, labelled)
        pool = np.setdiff1d(labelled, test)
        details.update(batch_key=batch_key, holdout=values)
        stratified_test = None
    else:
        pool, test, stratified_test = _draw(labelled, labels[labelled], test_fraction, seed, "test")
        details.update(test_fraction=float(test_fraction))
    if strategy == "few_shot":
        n_validation = int(n_per_class) if validation_fraction > 0 else 0
        train, validation = _few_shot(pool, labels[pool], int(n_per_class), n_validation, seed)
        details.update(n_per_class=int(n_per_class), stratified={"test": stratified_test})
    else:
        train, validation, stratified_validation = _draw(
            pool, labels[pool], validation_fraction, seed, "validation"
        )
        details["stratified"] = {"test": stratified_test, "validation": stratified_validation}
    parts = {"train": train, "validation": validation, "test": test}
    unseen = _check_training_labels(labels, parts, strategy, n_per_class, allow_unseen_test_labels)
    details["unseen_test_labels"] = unseen
    details["label_counts"] = {part: _label_counts(labels, rows) for part, rows in parts.items()}
    logger.info(
        "%s split of %d labelled cells: %s",
        strategy,
        labelled.size,
        ", ".join(f"{part} {rows.size}" for part, rows in parts.items()),
    )
    return LabelSplit(**parts, strategy=strategy, details=details, n_obs=len(obs))
