"""Fine-tune a pretrained encoder for a task: data, split, model, the shared loop, test scores.

``run_finetuning(task_config, args)`` is what ``finetuning/finetune.py`` and
``cellfoundry finetune`` call. Cells are tokenized in memory with the base model's own
tokenizer, split by a saved split file (made once from the run settings, reused on rerun and
resume), trained with :func:`cellfoundry.training.train` (validation cells scored every
``eval_every`` steps), then scored once on the test cells through :func:`predict`, the same
path users run. The output folder is the loop's (``run_args.yaml``, ``log.jsonl``,
``checkpoints/``) plus the task model (see :mod:`cellfoundry.tasks.base`),
``split.json`` and ``test_metrics.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry._io import atomic_write_text
from cellfoundry.tasks.base import TaskConfig, build_task_model, get_task
from cellfoundry.tasks.card import write_task_card
from cellfoundry.training.args import FinetuningArgs

logger = logging.getLogger(__name__)

TEST_METRICS_FILE = "test_metrics.json"


@dataclass
class FinetuneResult:
    """Where the model went and how it scored on the test cells."""

    output_dir: Path
    steps: int
    test_metrics: dict[str, Any]


def read_labelled(path: str | Path, label_key: str, batch_key: str | None = None):
    """Read an ``.h5ad`` and check that the label (and batch) columns exist."""
    import anndata

    adata = anndata.read_h5ad(path)
    for key in (label_key, batch_key):
        if key is not None and key not in adata.obs.columns:
            raise ValueError(
                f"{path} has no obs column {key!r} (columns: {list(adata.obs.columns)}); set "
                "label_key / batch_key to the column holding the labels / batches."
            )
    return adata


def load_or_make_split(adata: Any, args: FinetuningArgs):
    """The run's split: the saved file if there is one, else made from the settings and saved."""
    from cellfoundry.tasks.splits import LabelSplit, make_split

    path = args.split_path
    if path.is_file():
        logger.info("Using the split in %s", path)
        return LabelSplit.load(path, n_obs=adata.n_obs)
    split = make_split(
        adata.obs,
        args.label_key,
        args.split_strategy,
        batch_key=args.batch_key,
        holdout=args.holdout,
        n_per_class=args.n_per_class,
        seed=args.split_seed,
        drop_labels=args.drop_labels,
    )
    split.save(path)
    return split


def tokenize_cells(adata: Any, tokenizer: Any, max_length: int, allow_normalized: bool):
    """In-memory tokens of every cell, as a ``datasets.Dataset`` with each cell's ``row``."""
    import datasets

    from cellfoundry.tokenization import TokenizeOptions, tokenize_to_table

    options = TokenizeOptions(max_length=max_length, allow_normalized=allow_normalized)
    table, report = tokenize_to_table(adata, tokenizer, options)
    dropped = report.n_empty_dropped + report.n_no_vocab_gene_dropped
    if dropped:
        logger.warning("%d cells had no counts or no vocabulary gene and are left out.", dropped)
    return datasets.Dataset(table)


def positions_of(rows: np.ndarray, wanted: np.ndarray, part: str) -> np.ndarray:
    """Positions in the token dataset of the AnnData rows ``wanted`` (untokenized rows skipped)."""
    lookup = np.full(int(max(rows.max(), wanted.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[rows] = np.arange(rows.size)
    found = lookup[wanted]
    if (found < 0).any():
        logger.warning("%d %s cells were not tokenized and are skipped.", (found < 0).sum(), part)
    return found[found >= 0]


def run_finetuning(config: TaskConfig, args: FinetuningArgs) -> FinetuneResult:
    """Fine-tune ``config.base_model`` on ``args.data`` for ``config.task``; score the test cells.

    Parameters
    ----------
    config : TaskConfig
        The task head and tuning mode (labels are filled from the training cells).
    args : FinetuningArgs
        Data, split and loop settings.

    Returns
    -------
    FinetuneResult
    """
    from accelerate.utils import set_seed

    from cellfoundry.data import CellBatchCollator, TokenizedCells
    from cellfoundry.embedding import _tokenizer_for
    from cellfoundry.models import load_model
    from cellfoundry.training import make_dataloader, train
    from cellfoundry.training.loop import create_accelerator

    task = get_task(config.task)
    adata = read_labelled(args.data, args.label_key, args.batch_key)
    accelerator = create_accelerator(args)
    with accelerator.main_process_first():
        split = load_or_make_split(adata, args)
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    backbone = load_model(config.base_model, masked_gene_head=False, **kwargs)
    tokenizer = _tokenizer_for(backbone, None)
    positions = backbone.config.max_position_embeddings
    max_length = min(config.max_length or positions, positions)
    config.max_length = max_length
    dataset = tokenize_cells(adata, tokenizer, max_length, args.allow_normalized)
    rows = np.asarray(dataset["row"], dtype=np.int64)
    train_obs = adata.obs.iloc[split.train]
    dataset, targets = task.add_targets(
        dataset, adata.obs.iloc[rows], config, args, train_obs, adata=adata, tokenizer=tokenizer
    )
    parts = {
        name: positions_of(rows, getattr(split, name), name)
        for name in ("train", "validation", "test")
    }
    task.fit_config(config, dataset, parts["train"])
    set_seed(args.seed)  # head and LoRA initialisation
    model = build_task_model(config, backbone)
    collator = CellBatchCollator(tokenizer.vocab.pad_id, max_length, pad_to_multiple_of=8)
    train_cells = TokenizedCells(dataset, parts["train"], extra_columns=targets)
    task.prepare_head(model, make_dataloader(train_cells, collator, 64, shuffle=False, seed=0))
    eval_cells = None
    if parts["validation"].size:
        eval_cells = TokenizedCells(dataset, parts["validation"], extra_columns=targets)
    result = train(
        model,
        train_cells,
        collator,
        args,
        eval_cells=eval_cells,
        accelerator=accelerator,
        evaluate_fn=task.evaluate,
        description=f"fine-tuning {config.task}",
    )
    model = accelerator.unwrap_model(model).eval()
    test_adata = adata[np.sort(rows[parts["test"]])].copy()
    train_adata = adata[np.sort(rows[parts["train"]])].copy()
    metrics = task.score_test(model, train_adata, test_adata, args, adata=adata)
    metrics["split"] = {"strategy": split.strategy, **{k: int(v.size) for k, v in parts.items()}}
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        atomic_write_text(output_dir / TEST_METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        # The weights were saved by the loop's final checkpoint; only the config and the card
        # gain the test figures.
        config.metrics = task.card_metrics(metrics, args)
        config.save(output_dir)
        write_task_card(model, output_dir)
    accelerator.wait_for_everyone()
    return FinetuneResult(output_dir, result.step, metrics)
