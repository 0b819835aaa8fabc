"""Run settings of a pretraining job: one dataclass, read from YAML, saved beside the results.

A pretraining YAML file has two sections that are kept apart on purpose (design section 6):

``model``
    The architecture: ``type`` (``bert`` or ``mamba``) plus fields of
    :class:`~cellfoundry.models.CellBertConfig` / :class:`~cellfoundry.models.CellMambaConfig`.
    It ends up in the checkpoint's ``config.json``.
``training``
    Fields of :class:`PretrainingArgs` (data, optimisation, schedule, precision, paths,
    seed). They are saved as ``run_args.yaml`` in the output folder, so a run can be
    repeated or resumed from what it wrote.

Command-line overrides are ``key=value`` strings; ``model.<field>=value`` addresses the model
section. Values are parsed as YAML (``3e-4``, ``true``, ``[a, b]``) and converted to the
field's declared type.
"""

from __future__ import annotations

import difflib
import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cellfoundry._io import atomic_write_text

logger = logging.getLogger(__name__)

RUN_ARGS_FILE = "run_args.yaml"
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "linear", "constant")
ArgsT = TypeVar("ArgsT", bound="TrainingArgs")


@dataclass
class TrainingArgs:
    """What the training loop needs, shared by pretraining and fine-tuning runs.

    Parameters
    ----------
    output_dir : str
        Where ``run_args.yaml``, ``log.jsonl``, ``checkpoints/`` and the final model go.
    batch_size, eval_batch_size : int, int or None
        Cells per batch per device (eval defaults to ``batch_size``).
    gradient_accumulation_steps : int
        Batches per optimizer step: effective batch = ``batch_size * this * processes``.
    max_steps : int
        Optimizer steps of the whole run (the schedule is defined over them).
    learning_rate, weight_decay : float
        Peak AdamW learning rate and decoupled weight decay (not on biases and norms).
    adam_beta1, adam_beta2, adam_epsilon : float
        AdamW constants.
    lr_scheduler : {"cosine", "linear", "constant"}
        Decay after warm-up (transformers' ``get_scheduler``).
    warmup_steps, warmup_ratio : int, float
        Linear warm-up length: the larger of ``warmup_steps`` and
        ``ceil(warmup_ratio * max_steps)``, capped at ``max_steps``.
    min_lr_ratio : float
        Cosine only: floor of the learning rate as a share of the peak.
    max_grad_norm : float or None
        Clip the global gradient norm to this; ``None`` or 0 turns clipping off.
    log_every, eval_every, save_every : int, int or None, int or None
        Steps between log records, evaluations and checkpoints (``None``: only at the end).
        Keep ``save_every`` a multiple of ``log_every`` so a resumed log averages the same
        steps as an uninterrupted one.
    save_total_limit : int or None
        Keep only the newest this-many checkpoints.
    seed : int
        Seed of model initialisation, dropout, batch order and masks.
    mixed_precision : {"auto", "no", "bf16", "fp16"}
        ``auto``: bf16 on a GPU that supports it, fp32 otherwise (CPU).
    gradient_checkpointing : bool
        Recompute activations in the backward pass (less memory, about 30 % slower).
    attn_implementation : str or None
        CellBert attention kernel (``eager``, ``sdpa``, ``flash_attention_2``).
    dataloader_num_workers : int
        Worker processes that collate batches.
    length_group_batches : int
        Training batches per length-sorted group (``LengthGroupedBatchSampler``): larger
        groups pad less but make each batch's cells less random; 1 gives plain random batches.
    resume_from_checkpoint : str or None
        ``latest`` (newest in ``<output_dir>/checkpoints``) or a checkpoint folder.
    overwrite_output_dir : bool
        Allow starting a fresh run in a folder that already holds one.
    progress_bar : bool
        Show a tqdm bar on the main process.
    """

    output_dir: str = "runs/train"
    batch_size: int = 32
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    eval_every: int | None = 500
    save_every: int | None = 1000
    save_total_limit: int | None = 2
    seed: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    dataloader_num_workers: int = 0
    length_group_batches: int = 50
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in fields(self):
            setattr(self, item.name, _coerce(item.name, getattr(self, item.name), hints[item.name]))
        self._validate()

    def _validate(self) -> None:
        positive = (
            "batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "log_every",
            "length_group_batches",
        )
        optional_positive = ("eval_batch_size", "eval_every", "save_every", "save_total_limit")
        for name in positive:
            _check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        for name in optional_positive:
            value = getattr(self, name)
            _check(value is None or value > 0, name, value, "a positive integer or null")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "positive")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(0 <= self.min_lr_ratio < 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1)")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _check(self.lr_scheduler in LR_SCHEDULES, "lr_scheduler", self.lr_scheduler, LR_SCHEDULES)
        choices = MIXED_PRECISION_CHOICES
        _check(self.mixed_precision in choices, "mixed_precision", self.mixed_precision, choices)
        if self.warmup_steps > self.max_steps:
            logger.warning(
                "warmup_steps=%d > max_steps=%d: the learning rate warms up over the whole run "
                "and never decays (fine for a trial run).",
                self.warmup_steps,
                self.max_steps,
            )
        if self.save_every and self.save_every % self.log_every:
            logger.warning(
                "save_every=%d is not a multiple of log_every=%d: the first log record after a "
                "resume will average fewer steps than an uninterrupted run's.",
                self.save_every,
                self.log_every,
            )

    # -- derived values --------------------------------------------------------------------
    @property
    def num_warmup_steps(self) -> int:
        """Warm-up length in optimizer steps, at most ``max_steps`` (short trial runs)."""
        # round() first: 0.1 * 1000 is 100.00000000000001 in floating point, not 101 steps.
        steps = max(self.warmup_steps, math.ceil(round(self.warmup_ratio * self.max_steps, 6)))
        return min(steps, self.max_steps)

    # -- I/O -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[ArgsT], values: Mapping[str, Any]) -> ArgsT:
        """Build from a mapping, naming unknown keys (with close matches) instead of ignoring."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            detail = ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()
            )
            raise ValueError(
                f"Unknown training field(s) {detail}. Valid fields are the attributes of "
                f"{cls.__name__}; model sizes belong under the 'model' section."
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain-type mapping (what ``run_args.yaml`` holds)."""
        return asdict(self)

    def with_overrides(self: ArgsT, overrides: Mapping[str, Any]) -> ArgsT:
        """A copy with some fields changed (values converted and validated like YAML input)."""
        merged = {**self.to_dict(), **overrides}
        return type(self).from_dict(merged)

    def save(self, output_dir: str | Path | None = None) -> Path:
        """Write ``run_args.yaml`` (atomically) into ``output_dir`` (default: the run's)."""
        path = Path(output_dir or self.output_dir) / RUN_ARGS_FILE
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write_text(path, f"# cellfoundry {type(self).__name__}\n" + text)

    @classmethod
    def load(cls: type[ArgsT], path: str | Path) -> ArgsT:
        """Read ``run_args.yaml`` (or a folder holding one)."""
        path = Path(path)
        path = path / RUN_ARGS_FILE if path.is_dir() else path
        return cls.from_dict(_read_yaml_mapping(path))


@dataclass
class PretrainingArgs(TrainingArgs):
    """A masked-gene pretraining run: the loop's settings (:class:`TrainingArgs`) plus data.

    Parameters
    ----------
    data : list of str
        Tokenized folders (``cellfoundry tokenize`` output); all must share one vocabulary.
    tokenizer : str or None
        Tokenizer name or folder; ``None`` uses the one recorded in the data's manifest.
    init_from : str or None
        Start from this checkpoint's weights instead of a fresh model (continued
        pretraining); the ``model`` section is then ignored.
    split_file : str or None
        Train/eval split file; ``None`` means ``<output_dir>/split.json``. An existing file
        is reused as is.
    eval_fraction, split_seed : float, int
        Share of cells held out and the seed that picks them (only when the file is made).
    max_length : int or None
        Truncate cells to this many tokens (``<cls>`` + top-ranked genes); ``None`` uses the
        model's ``max_position_embeddings``.
    mlm_probability : float
        Share of gene tokens selected for prediction (80/10/10 mask/random/keep).
    pad_to_multiple_of : int or None
        Pad batch length to a multiple of this.
    max_eval_cells : int or None
        Score a fixed random subset of this many held-out cells at each evaluation (the
        same subset every time); ``None`` scores all of them.
    """

    output_dir: str = "runs/pretrain"
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    init_from: str | None = None
    split_file: str | None = None
    eval_fraction: float = 0.05
    split_seed: int = 0
    max_length: int | None = None
    mlm_probability: float = 0.15
    pad_to_multiple_of: int | None = 8
    max_eval_cells: int | None = None

    def _validate(self) -> None:
        super()._validate()
        for name in ("max_length", "pad_to_multiple_of", "max_eval_cells"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, value, "a positive integer or null")
        _check(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "in [0, 1)")
        _check(0 < self.mlm_probability <= 1, "mlm_probability", self.mlm_probability, "in (0, 1]")

    @property
    def split_path(self) -> Path:
        """The split file this run reads or writes."""
        return Path(self.split_file) if self.split_file else Path(self.output_dir) / "split.json"


@dataclass
class FinetuningArgs(TrainingArgs):
    """A task fine-tuning run: the loop's settings (:class:`TrainingArgs`) plus labelled data.

    The task head (base model, labels, pooling, LoRA rank, what trains, context length) is
    the task config's business (``task_config.json``), not the run's (design section 6).

    Parameters
    ----------
    data : str
        ``.h5ad`` with raw counts and the label (and batch) columns.
    label_key, batch_key : str, str or None
        ``obs`` columns with the labels to learn and the batch / donor / section.
    split_file : str or None
        A split (``cellfoundry.tasks.LabelSplit`` JSON); ``None`` means
        ``<output_dir>/split.json``, made from the settings below when missing.
    split_strategy : {"random", "holdout", "few_shot"}
        How cells are split (see :func:`cellfoundry.tasks.make_split`).
    holdout : list of str or None
        ``holdout`` strategy: ``batch_key`` values whose cells form the test set.
    n_per_class : int or None
        ``few_shot`` strategy: training cells per label.
    drop_labels : list of str
        Labels whose cells are left out entirely (e.g. ``NA``, ``unlabelled``).
    split_seed : int
        Seed of the split (only when the file is made).
    allow_normalized : bool
        Accept non-count input (e.g. MERFISH volume-normalised values); see the tokenizer.
    head_learning_rate : float or None
        Peak learning rate of the task head; ``None`` uses ``learning_rate``. A fresh head
        needs a larger step than LoRA adapters or pretrained weights can take.
    head_only_steps : int
        Steps at the start in which only the head trains (the encoder's learning rate is 0,
        then its warm-up and decay run over the remaining steps): "linear probe, then
        fine-tune" (Kumar et al. 2022), so a random head's gradients do not distort the
        pretrained encoder first. Needs ``head_learning_rate``.

    Notes
    -----
    ``length_group_batches`` defaults to 1 here: batches of cells sorted by length are batches
    of similar cell types (types differ in detected genes), which starves a classifier of
    contrast within a batch and skews batch statistics; cells are short enough that padding
    costs little.
    """

    output_dir: str = "runs/finetune"
    length_group_batches: int = 1
    learning_rate: float = 1e-3
    max_steps: int = 300
    eval_every: int | None = 100
    save_every: int | None = None
    log_every: int = 10
    warmup_ratio: float = 0.1
    data: str = ""
    label_key: str = "cell_type"
    batch_key: str | None = None
    split_file: str | None = None
    split_strategy: str = "random"
    holdout: list[str] | None = None
    n_per_class: int | None = None
    drop_labels: list[str] = field(default_factory=list)
    split_seed: int = 0
    allow_normalized: bool = False
    head_learning_rate: float | None = None
    head_only_steps: int = 0

    def _validate(self) -> None:
        super()._validate()
        strategies = ("random", "holdout", "few_shot")
        _check(self.split_strategy in strategies, "split_strategy", self.split_strategy, strategies)
        rate = self.head_learning_rate
        _check(rate is None or rate > 0, "head_learning_rate", rate, "positive or null")
        held = self.head_only_steps
        _check(held >= 0, "head_only_steps", held, "0 or more")
        _check(
            held == 0 or rate is not None,
            "head_only_steps",
            held,
            "0 unless head_learning_rate is set (the head's own group trains meanwhile)",
        )

    @property
    def learning_rates(self) -> dict[str, float]:
        """Per-prefix learning rates for the optimizer (the head's, when set)."""
        return {} if self.head_learning_rate is None else {"head.": self.head_learning_rate}

    @property
    def split_path(self) -> Path:
        """The split file this run reads or writes."""
        return Path(self.split_file) if self.split_file else Path(self.output_dir) / "split.json"


def resolve_mixed_precision(value: str = "auto") -> str:
    """Turn ``auto`` into what accelerate understands: ``bf16`` on a capable GPU, else ``no``.

    bf16 keeps fp32's exponent range, so it needs no loss scaling and is the safe default on
    Ampere or newer GPUs; on CPU fp32 is both exact (bit-reproducible resume) and not slower.
    """
    if value not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision={value!r}; use one of {MIXED_PRECISION_CHOICES}.")
    if value != "auto":
        return value
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are YAML (``1e-3``, ``true``, ``[a, b]``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"Override {item!r} is not key=value; write e.g. learning_rate=3e-4 or "
                "model.hidden_size=128."
            )
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


def load_pretraining_config(
    path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> tuple[dict[str, Any], PretrainingArgs]:
    """Read a pretraining YAML file into the model section and :class:`PretrainingArgs`.

    Parameters
    ----------
    path : path
        YAML with ``model`` and ``training`` sections (see the module docstring).
    overrides : mapping or sequence of ``key=value`` strings
        Changes on top of the file; ``model.<field>`` keys go to the model section.

    Returns
    -------
    model_spec : dict
        ``type`` plus architecture fields, for
        :func:`cellfoundry.training.build_masked_gene_model`.
    args : PretrainingArgs
    """
    config = _read_yaml_mapping(Path(path))
    extra = sorted(set(config) - {"model", "training"})
    if extra:
        raise ValueError(
            f"{path}: unknown top-level section(s) {extra}; use 'model' (architecture) and "
            "'training' (PretrainingArgs fields)."
        )
    model_spec = dict(config.get("model") or {})
    training = dict(config.get("training") or {})
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        if key.startswith("model."):
            model_spec[key.removeprefix("model.")] = value
        else:
            training[key] = value
    return model_spec, PretrainingArgs.from_dict(training)


TOKENIZER_FIELDS = (
    "vocab_size",
    "pad_token_id",
    "mask_token_id",
    "cls_token_id",
    "tokenizer_id",
    "vocab_sha256",
)
"""Architecture fields that always come from the tokenizer, never from a run config."""


def model_config_kwargs(config_class: type, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check and convert the architecture fields of a ``model`` section for ``config_class``.

    transformers configs accept unknown keyword arguments silently, so a typo such as
    ``hiden_size`` would train a default-sized model; this names it instead. Values are
    converted to the declared types (YAML reads ``1e-5`` as a string).

    Parameters
    ----------
    config_class : type
        A dataclass config such as ``CellBertConfig``.
    spec : mapping
        The ``model`` section without its ``type`` key.

    Returns
    -------
    dict
        Keyword arguments for ``config_class.from_tokenizer``.
    """
    known = {item.name: item.type for item in fields(config_class)}
    owned = sorted(set(spec) & set(TOKENIZER_FIELDS))
    if owned:
        raise ValueError(
            f"model fields {owned} are set from the tokenizer; remove them from the config "
            "(choose the tokenizer with training.tokenizer or the data)."
        )
    unknown = sorted(set(spec) - set(known))
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        raise ValueError(
            f"Unknown {config_class.__name__} field(s) {unknown} (close matches: {hints}); "
            "fix the model section of the config."
        )
    kwargs = {}
    for name, value in spec.items():
        annotation = _annotation_type(known[name])
        kwargs[name] = value if annotation is None else _coerce(f"model.{name}", value, annotation)
    return kwargs


def _annotation_type(annotation: Any) -> Any:
    """The type a config annotation names (``'float | int'`` -> ``float | int``), or None.

    Configs use postponed annotations (strings). Only plain scalar unions are understood;
    anything else (e.g. ``torch.dtype``) returns None and the value is passed through.
    """
    if not isinstance(annotation, str):
        return annotation
    scalars = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
    parts = [part.strip() for part in annotation.split("|")]
    if not all(part in scalars for part in parts):
        return None
    union = scalars[parts[0]]
    for part in parts[1:]:
        union = union | scalars[part]
    return union


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"Cannot read YAML config {path}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} must hold a YAML mapping (key: value), not {type(data).__name__}."
        )
    return data


def _check(ok: bool, name: str, value: Any, expected: Any) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {expected}. Fix the run config.")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to a field's declared type, or raise naming the field.

    PyYAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``), and command-line values
    arrive as strings, so numbers are converted here rather than rejected.
    """
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        items = [value] if isinstance(value, (str, Path)) else list(value or [])
        return [str(item) for item in items]
    try:
        return _coerce_scalar(value, annotation)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={value!r} is not a valid {annotation.__name__}; fix the run config."
        ) from None


def _coerce_scalar(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(value)
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    return value
