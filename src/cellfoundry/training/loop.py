"""The one training loop: accelerate, gradient accumulation, evaluation, checkpoints, exact resume.

Every training script (pretraining and task fine-tuning) runs :func:`train`; the scripts
only parse a config and build the model and data. The same code runs on one CPU, one GPU,
several GPUs with DDP, FSDP or DeepSpeed: ``accelerate launch --config_file ...`` chooses.

Exact resume
------------
A run stopped after step ``k`` and resumed from its checkpoint logs the same losses at every
later step as a run that never stopped (bit-equal on CPU in fp32). That needs everything a
step depends on to be restored or recomputed:

* weights, AdamW moments, the scheduler and accelerate's accumulation counter:
  ``accelerator.save_state`` / ``load_state``;
* the global torch / numpy / python RNG states (dropout): also ``save_state``; data loaders
  get their own ``torch.Generator`` so creating an iterator never draws from the global RNG;
* the batch order: :class:`~cellfoundry.data.LengthGroupedBatchSampler` is a function of
  ``(seed, epoch)``, and ``trainer_state.json`` records the epoch and how many batches of it
  were consumed, which ``accelerator.skip_first_batches`` skips without reading them;
* the masks: drawn per cell from ``(seed, epoch, cell index)``, so skipped batches need no
  replay (see :mod:`cellfoundry.data.collators`).

Output folder
-------------
``run_args.yaml`` (the run config), ``log.jsonl`` (one JSON record per logging/eval step),
``checkpoints/step-XXXXXXXX/`` (accelerate state + ``trainer_state.json``), and the latest
model as ``config.json`` + ``model.safetensors`` (``from_pretrained(output_dir)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cellfoundry._io import atomic_write_text
from cellfoundry.data import (
    IGNORE_INDEX,
    LengthGroupedBatchSampler,
    MaskedGeneCollator,
    TokenizedCells,
    derive_seed,
    load_corpus,
    split_cells,
)
from cellfoundry.training.args import (
    PretrainingArgs,
    TrainingArgs,
    model_config_kwargs,
    resolve_mixed_precision,
)
from cellfoundry.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
TOP_K = (1, 10)


@dataclass
class TrainerState:
    """Where a run is: saved as ``trainer_state.json`` in every checkpoint.

    Attributes
    ----------
    step : int
        Optimizer steps done.
    epoch : int
        Current pass over the training cells (seeds batch order and masks).
    batches_in_epoch : int
        Batches of this epoch already consumed on each process (skipped on resume).
    setup : dict
        Settings that must match for an exact resume (batch size, accumulation, seed,
        processes, batches per epoch); a resume that differs is warned about.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    setup: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write as JSON (atomically)."""
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        """Read a ``trainer_state.json``."""
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: {path.parent} is not a complete checkpoint of this loop."
            )
        return cls(**json.loads(path.read_text()))


@dataclass
class TrainResult:
    """What :func:`train` returns: final step, folders and last metrics.

    ``is_main_process`` lets a script print its summary once under DDP/FSDP.
    """

    step: int
    output_dir: Path
    checkpoint: Path | None
    train_loss: float | None
    eval_metrics: dict[str, float]
    is_main_process: bool = True


StepCallback = Callable[[TrainerState, Mapping[str, Any]], None]
EvaluateFn = Callable[[torch.nn.Module, Any, Accelerator], dict[str, float]]
"""Called after every optimizer step (after logging, evaluation and saving) with the state
and the record logged at that step (empty when nothing was logged)."""


@dataclass
class _Run:
    """Objects one training run passes between the loop's helpers."""

    args: TrainingArgs
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    epoch_setters: list[Any]
    output_dir: Path
    callbacks: Sequence[StepCallback]
    evaluate_fn: EvaluateFn
    description: str
    window: _Window = field(default_factory=lambda: _Window())
    grad_norm: float | None = None
    last_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


class _Window:
    """Running sums between two log records (kept on device: no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.batches = 0
        self.tokens: torch.Tensor | int = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + loss.detach().float()
        self.tokens = self.tokens + tokens
        self.batches += 1

    def summary(self, accelerator: Accelerator) -> dict[str, float]:
        """Mean loss over the window's batches (and processes) and tokens per second."""
        device = accelerator.device
        loss = torch.as_tensor(self.loss_sum, device=device, dtype=torch.float32)
        mean = accelerator.reduce(loss / max(self.batches, 1), reduction="mean")
        tokens = accelerator.reduce(torch.as_tensor(self.tokens, device=device), reduction="sum")
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"loss": float(mean), "tokens_per_s": round(float(tokens) / elapsed, 1)}


# -- setup ------------------------------------------------------------------------------------
def create_accelerator(args: TrainingArgs) -> Accelerator:
    """The ``Accelerator`` of a run: precision, accumulation and scheduler stepping.

    Accumulation windows run across epoch boundaries (``sync_with_dataloader=False``) so an
    optimizer step is always ``gradient_accumulation_steps`` batches, and the scheduler is
    stepped by the loop once per optimizer step (``step_scheduler_with_optimizer=False``):
    accelerate would otherwise step it once per process and count ``max_steps`` wrongly
    under DDP.
    """
    plugin = GradientAccumulationPlugin(
        num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
    )
    return Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_plugin=plugin,
        step_scheduler_with_optimizer=False,
        project_dir=args.output_dir,
    )


def make_dataloader(
    cells: TokenizedCells,
    collator: MaskedGeneCollator,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    group_batches: int = 50,
) -> DataLoader:
    """A ``DataLoader`` with length-grouped batches and its own generator.

    The private generator keeps iterator creation (which draws a base seed for workers) off
    the global torch RNG, whose stream belongs to dropout and is restored on resume.
    """
    sampler = LengthGroupedBatchSampler(
        cells.lengths, batch_size, shuffle=shuffle, seed=seed, group_batches=group_batches
    )
    return DataLoader(
        cells,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(derive_seed(seed, 1)),
    )


def _prepare_output_dir(args: TrainingArgs, accelerator: Accelerator) -> Path:
    """Create the folder, refuse to mix two runs in it, write ``run_args.yaml``."""
    output_dir = Path(args.output_dir)
    resuming = args.resume_from_checkpoint is not None
    if (output_dir / LOG_FILE).exists() and not resuming and not args.overwrite_output_dir:
        raise ValueError(
            f"{output_dir} already holds a run ({LOG_FILE}). Resume it with "
            "resume_from_checkpoint=latest, start over with overwrite_output_dir=true, or "
            "choose another output_dir."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and not resuming:
            (output_dir / LOG_FILE).unlink(missing_ok=True)
            shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
        args.save(output_dir)
    accelerator.wait_for_everyone()
    return output_dir


# -- training ---------------------------------------------------------------------------------
def train(
    model: torch.nn.Module,
    train_cells: TokenizedCells,
    collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]],
    args: TrainingArgs,
    *,
    eval_cells: TokenizedCells | None = None,
    accelerator: Accelerator | None = None,
    callbacks: Sequence[StepCallback] = (),
    evaluate_fn: EvaluateFn | None = None,
    description: str = "pretraining",
) -> TrainResult:
    """Train ``model`` for ``args.max_steps`` optimizer steps (masked genes or a task).

    Parameters
    ----------
    model : torch.nn.Module
        Returns an output with ``loss`` when called on a collated batch: a
        ``...ForMaskedGeneModeling`` model or a task model. Saved with its own
        ``save_pretrained(folder, state_dict=...)``.
    train_cells, eval_cells : TokenizedCells
        Training cells and (optionally) held-out cells scored every ``args.eval_every``.
    collator : callable
        Batches cells (e.g. :class:`~cellfoundry.data.MaskedGeneCollator`, which masks);
        evaluation uses a copy, reset to epoch 0, so its masks are the same every time.
    args : TrainingArgs
        Run settings; ``resume_from_checkpoint`` continues a run exactly.
    accelerator : Accelerator or None
        Made by :func:`create_accelerator` when not given.
    callbacks : sequence of callables
        ``callback(state, record)`` after every optimizer step.
    evaluate_fn : callable or None
        ``evaluate_fn(model, loader, accelerator) -> {"eval_...": value}``; ``None`` scores
        masked genes (:func:`evaluate`).
    description : str
        Progress-bar label.

    Returns
    -------
    TrainResult
    """
    accelerator = accelerator or create_accelerator(args)
    set_seed(args.seed)
    output_dir = _prepare_output_dir(args, accelerator)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_loader = make_dataloader(
        train_cells,
        collator,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        num_workers=args.dataloader_num_workers,
        group_batches=args.length_group_batches,
    )
    if len(train_loader) == 0:
        raise ValueError("No training cells: the corpus is empty or everything is held out.")
    eval_loader = None
    if eval_cells is not None and len(eval_cells):
        # A fresh copy at epoch 0: the same masks at every evaluation.
        fresh = dataclasses.is_dataclass(collator)
        eval_collator = dataclasses.replace(collator) if fresh else collator
        eval_batch = args.eval_batch_size or args.batch_size
        eval_loader = make_dataloader(eval_cells, eval_collator, eval_batch, shuffle=False, seed=0)
    optimizer = build_optimizer(
        model,
        args.learning_rate,
        args.weight_decay,
        (args.adam_beta1, args.adam_beta2),
        args.adam_epsilon,
        getattr(args, "learning_rates", None),
    )
    held_steps = getattr(args, "head_only_steps", 0)
    scheduler = build_scheduler(
        optimizer,
        args.lr_scheduler,
        args.num_warmup_steps,
        args.max_steps,
        args.min_lr_ratio,
        held_groups=[i for i, g in enumerate(optimizer.param_groups) if not g["prefix"]],
        held_steps=held_steps,
    )
    epoch_setters = [train_loader.batch_sampler]
    if hasattr(collator, "set_epoch"):
        epoch_setters.append(collator)
    model, optimizer, scheduler, train_loader = accelerator.prepare(
        model, optimizer, scheduler, train_loader
    )
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    run = _Run(
        args,
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        eval_loader,
        epoch_setters,
        output_dir,
        callbacks,
        evaluate_fn or evaluate,
        description,
    )
    state = _resume(run) if args.resume_from_checkpoint else TrainerState()
    state.setup = _setup_fingerprint(run)
    return _train_steps(run, state)


def _train_steps(run: _Run, state: TrainerState) -> TrainResult:
    """Iterate epochs and batches until ``max_steps`` optimizer steps are done."""
    args, accelerator = run.args, run.accelerator
    run.model.train()
    progress = tqdm(
        total=args.max_steps,
        initial=state.step,
        desc=run.description,
        unit="step",
        disable=not (args.progress_bar and accelerator.is_local_main_process),
    )
    run.window.reset()
    while state.step < args.max_steps:
        for batch in _epoch_batches(run, state):
            loss = _forward_backward(run, batch)
            state.batches_in_epoch += 1
            run.window.add(loss, batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            _after_step(run, state, progress)
            if state.step >= args.max_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        state.step,
        run.output_dir,
        run.checkpoint,
        run.last_loss,
        run.last_eval,
        accelerator.is_main_process,
    )


def _epoch_batches(run: _Run, state: TrainerState) -> Any:
    """The loader for ``state.epoch``, past the batches already consumed (resume)."""
    for item in run.epoch_setters:
        item.set_epoch(state.epoch)
    run.train_loader.set_epoch(state.epoch)
    if state.batches_in_epoch:
        return run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
    return run.train_loader


def _forward_backward(run: _Run, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One batch: loss, backward, and on window ends clip, optimizer and scheduler step."""
    accelerator, args = run.accelerator, run.args
    with accelerator.accumulate(run.model):
        loss = run.model(**batch).loss
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            norm = accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
            run.grad_norm = None if norm is None else float(norm)
        run.optimizer.step()  # accelerate skips these until the window's last batch
        run.optimizer.zero_grad()
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
    return loss


def _after_step(run: _Run, state: TrainerState, progress: Any) -> None:
    """Log, evaluate, save and call callbacks as the step number asks."""
    args, step = run.args, state.step
    last = step >= args.max_steps
    record: dict[str, Any] = {}
    if step % args.log_every == 0 or last:
        record.update(run.window.summary(run.accelerator))
        record["lr"] = float(run.scheduler.get_last_lr()[0])
        if run.grad_norm is not None:
            record["grad_norm"] = run.grad_norm
        run.last_loss = record["loss"]
        run.window.reset()
    paused = time.perf_counter()  # evaluation and saving do not count towards tokens/s
    if run.eval_loader is not None and ((args.eval_every and step % args.eval_every == 0) or last):
        run.last_eval = run.evaluate_fn(run.model, run.eval_loader, run.accelerator)
        record.update(run.last_eval)
    if record:
        epoch = state.epoch + state.batches_in_epoch / max(len(run.train_loader), 1)
        # Wall-clock time (Unix seconds) lets model cards state the training time measured.
        record = {"step": step, "epoch": round(epoch, 4), "time": round(time.time(), 1), **record}
        _append_log(run, record)
        progress.set_postfix({k: record[k] for k in ("loss", "eval_loss") if k in record})
    if (args.save_every and step % args.save_every == 0) or last:
        run.checkpoint = save_checkpoint(run, state)
    run.window.started += time.perf_counter() - paused
    for callback in run.callbacks:
        callback(state, record)


# -- evaluation -------------------------------------------------------------------------------
def masked_gene_counts(
    logits: torch.Tensor, labels: torch.Tensor, top_k: Sequence[int] = TOP_K
) -> torch.Tensor:
    """Number of scored positions and of hits within each top-k (float64 counts).

    Parameters
    ----------
    logits : torch.Tensor
        (M, V) at the labelled positions in row-major order (what the masked-gene models
        return with labels), or (B, L, V) at every position.
    labels : torch.Tensor
        (B, L) long, -100 where nothing is scored.
    top_k : sequence of int
        The ks to count (capped at V).

    Returns
    -------
    torch.Tensor
        (1 + len(top_k),) float64: ``[M, hits@k for k in top_k]``.
    """
    selected = labels != IGNORE_INDEX
    targets = labels[selected]
    if logits.ndim == 3:
        logits = logits[selected]
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Got logits for {logits.shape[0]} positions but {targets.shape[0]} labelled "
            "positions; pass the logits the model returned for these labels."
        )
    counts = [float(targets.numel())]
    ranked = logits.topk(min(max(top_k), logits.shape[-1]), dim=-1).indices
    for k in top_k:
        counts.append(float((ranked[:, :k] == targets.unsqueeze(1)).any(dim=1).sum()))
    return torch.tensor(counts, dtype=torch.float64)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
    """Masked-gene loss and top-1/top-10 accuracy over every batch of ``loader``.

    The loss is averaged over masked positions (not batches), so batches of different
    sizes weigh by what they score. Under DDP the last batches may repeat a few cells to
    keep ranks even; the counts include them.

    Returns
    -------
    dict
        ``eval_loss``, ``eval_top1``, ``eval_top10`` and ``eval_masked_genes``.
    """
    model.eval()
    totals = torch.zeros(2 + len(TOP_K), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        outputs = model(**batch)
        counts = masked_gene_counts(outputs.logits, batch["labels"]).to(totals.device)
        totals[0] += outputs.loss.double() * counts[0]
        totals[1:] += counts
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    scored = max(float(totals[1]), 1.0)
    metrics = {"eval_loss": float(totals[0]) / scored}
    for index, k in enumerate(TOP_K):
        metrics[f"eval_top{k}"] = float(totals[2 + index]) / scored
    metrics["eval_masked_genes"] = int(totals[1])
    return metrics


# -- checkpoints and logs ---------------------------------------------------------------------
def save_checkpoint(run: _Run, state: TrainerState) -> Path:
    """Save the full training state under ``checkpoints/`` and the model in ``output_dir``.

    The state goes to a temporary folder that is renamed when complete, so a run killed
    while saving leaves the previous checkpoints intact and never a half-written one.
    """
    accelerator = run.accelerator
    root = run.output_dir / CHECKPOINTS_DIR
    final = root / f"step-{state.step:08d}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(partial / TRAINER_STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _prune_checkpoints(root, run.args.save_total_limit)
    export_model(accelerator, run.model, run.output_dir)
    if accelerator.is_main_process:
        logger.info("Saved checkpoint %s", final)
    return final


def export_model(accelerator: Accelerator, model: torch.nn.Module, output_dir: Path) -> None:
    """``save_pretrained`` the unwrapped model into ``output_dir`` (config + safetensors).

    ``accelerator.get_state_dict`` gathers FSDP/DeepSpeed shards, so it runs on every
    process; only the main process writes, into a temporary folder whose files are then
    renamed into place.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        staging = Path(tempfile.mkdtemp(prefix=".model-", dir=output_dir))
        try:
            accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
            for path in staging.iterdir():
                path.chmod(0o644)  # shared and shipped outputs; writers may create 0600 files
                os.replace(path, output_dir / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()


def _prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    checkpoints = sorted(path for path in root.glob("step-*") if path.is_dir())
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """Resolve ``latest`` (newest in ``output_dir/checkpoints``) or a checkpoint path."""
    if spec == "latest":
        checkpoints = sorted((output_dir / CHECKPOINTS_DIR).glob("step-*"))
        if not checkpoints:
            raise ValueError(
                f"resume_from_checkpoint=latest but {output_dir / CHECKPOINTS_DIR} holds no "
                "checkpoint; start without resume_from_checkpoint or point it at one."
            )
        return checkpoints[-1]
    path = Path(spec)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ValueError(
            f"{path} is not a checkpoint folder ({TRAINER_STATE_FILE} missing); pass "
            "'latest' or a folder under <output_dir>/checkpoints."
        )
    return path


def _resume(run: _Run) -> TrainerState:
    """Load a checkpoint and return the state to continue from."""
    path = find_checkpoint(str(run.args.resume_from_checkpoint), run.output_dir)
    run.accelerator.load_state(str(path))
    state = TrainerState.load(path / TRAINER_STATE_FILE)
    now = _setup_fingerprint(run)
    if state.setup and state.setup != now and run.accelerator.is_main_process:
        logger.warning(
            "Resuming %s with a different setup (%s, was %s): the run continues but will not "
            "match an uninterrupted one step for step.",
            path,
            now,
            state.setup,
        )
    if state.batches_in_epoch >= len(run.train_loader):
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    if run.accelerator.is_main_process:
        _truncate_log(run.output_dir / LOG_FILE, state.step)
        logger.info("Resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    run.accelerator.wait_for_everyone()
    return state


def _setup_fingerprint(run: _Run) -> dict[str, int]:
    return {
        "batch_size": run.args.batch_size,
        "gradient_accumulation_steps": run.args.gradient_accumulation_steps,
        "seed": run.args.seed,
        "num_processes": run.accelerator.num_processes,
        "batches_per_epoch": len(run.train_loader),
    }


def _append_log(run: _Run, record: Mapping[str, Any]) -> None:
    if run.accelerator.is_main_process:
        with open(run.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step``: a resumed run rewrites them, the log stays one history."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl``."""
    text = (Path(output_dir) / LOG_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- pretraining entry point ------------------------------------------------------------------
MODEL_TYPE_ALIASES = {"bert": "cellfoundry-bert", "mamba": "cellfoundry-mamba"}


def build_masked_gene_model(
    model_spec: Mapping[str, Any], tokenizer: Any, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A freshly initialised ``...ForMaskedGeneModeling`` from a config's ``model`` section.

    Parameters
    ----------
    model_spec : mapping
        ``type`` (``bert``/``mamba`` or the full ``cellfoundry-...`` model type) plus
        architecture fields; vocabulary fields come from ``tokenizer``.
    tokenizer
        The tokenizer of the training data (``load_tokenizer``).
    attn_implementation : str or None
        CellBert attention kernel; ignored for CellMamba.
    """
    from cellfoundry.models import MODEL_CLASSES

    spec = dict(model_spec)
    kind = spec.pop("type", None)
    model_type = MODEL_TYPE_ALIASES.get(kind, kind)
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"model.type={kind!r} is unknown; use one of {sorted(MODEL_TYPE_ALIASES)} "
            f"(or {sorted(MODEL_CLASSES)})."
        )
    config_class, _, mgm_class = MODEL_CLASSES[model_type]
    config = config_class.from_tokenizer(tokenizer, **model_config_kwargs(config_class, spec))
    model = mgm_class(config)
    if attn_implementation and model_type == "cellfoundry-bert":
        model.set_attn_implementation(attn_implementation)
    return model


def run_pretraining(model_spec: Mapping[str, Any], args: PretrainingArgs) -> TrainResult:
    """Masked-gene pretraining from tokenized folders: data, split, model, then :func:`train`.

    Parameters
    ----------
    model_spec : mapping
        The config's ``model`` section (ignored with ``args.init_from``).
    args : PretrainingArgs
        Run settings (see :func:`cellfoundry.training.load_pretraining_config`).

    Returns
    -------
    TrainResult
    """
    from cellfoundry.models import check_tokenizer_compatible, load_model
    from cellfoundry.tokenization import load_tokenizer

    accelerator = create_accelerator(args)
    corpus = load_corpus(args.data)
    tokenizer = load_tokenizer(args.tokenizer or corpus.tokenizer_id)
    if tokenizer.vocab.sha256 != corpus.vocab_sha256:
        raise ValueError(
            f"Tokenizer {tokenizer.name!r} (vocab_sha256={tokenizer.vocab.sha256[:12]}...) "
            f"is not the one the data was tokenized with ({corpus.tokenizer_id!r}, "
            f"{corpus.vocab_sha256[:12]}...); set training.tokenizer to it or re-tokenize."
        )
    with accelerator.main_process_first():
        split = split_cells(corpus, args.eval_fraction, args.split_seed, args.split_path)
    set_seed(args.seed)  # model initialisation
    if args.init_from:
        attention = {"attn_implementation": args.attn_implementation}
        kwargs = attention if args.attn_implementation else {}
        model = load_model(args.init_from, masked_gene_head=True, **kwargs)
    else:
        model = build_masked_gene_model(model_spec, tokenizer, args.attn_implementation)
    check_tokenizer_compatible(model, tokenizer)
    positions = model.config.max_position_embeddings
    collator = MaskedGeneCollator.from_tokenizer(
        tokenizer,
        mlm_probability=args.mlm_probability,
        pad_to_multiple_of=args.pad_to_multiple_of,
        max_length=min(args.max_length or positions, positions),
        seed=args.seed,
    )
    eval_indices = split.eval_indices
    if args.max_eval_cells is not None and len(eval_indices) > args.max_eval_cells:
        chosen = np.random.default_rng(args.split_seed).permutation(len(eval_indices))
        eval_indices = np.sort(eval_indices[chosen[: args.max_eval_cells]])
    if accelerator.is_main_process:
        logger.info(
            "Pretraining on %d cells (%d held out, %d scored per evaluation)",
            len(split.train_indices),
            len(split.eval_indices),
            len(eval_indices),
        )
    eval_cells = corpus.cells(eval_indices) if len(eval_indices) else None
    return train(
        model,
        corpus.cells(split.train_indices),
        collator,
        args,
        eval_cells=eval_cells,
        accelerator=accelerator,
    )
