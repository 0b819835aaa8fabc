"""Command-line entry for task fine-tuning, shared by ``finetuning/finetune.py`` and the CLI.

A fine-tuning YAML file has two sections, kept apart like pretraining's (design section 6):

``task``
    Fields of the task's config (:class:`~cellfoundry.tasks.AnnotationConfig`, ...): base
    model, tuning mode, pooling, LoRA rank, head; saved as ``task_config.json``.
``training``
    Fields of :class:`~cellfoundry.training.FinetuningArgs`: data, labels column, split,
    optimisation; saved as ``run_args.yaml``.

Overrides are ``key=value``; ``task.<field>=value`` addresses the task section.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cellfoundry.training.args import FinetuningArgs, parse_overrides
from cellfoundry.training.entry import collect_overrides, configure_logging


def load_finetuning_config(
    path: str | Path | None, task: str, overrides: Mapping[str, Any] | Sequence[str] = ()
):
    """Read a fine-tuning YAML into the task config and :class:`FinetuningArgs`.

    Returns
    -------
    (TaskConfig, FinetuningArgs)
    """
    from cellfoundry.tasks.base import TaskConfig

    config: dict[str, Any] = {}
    if path is not None:
        config = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping with 'task' and 'training' sections.")
        extra = sorted(set(config) - {"task", "training"})
        if extra:
            raise ValueError(
                f"{path}: unknown top-level section(s) {extra}; use 'task' (head, base model, "
                "tuning) and 'training' (data, split, optimisation)."
            )
    task_section = dict(config.get("task") or {})
    training = dict(config.get("training") or {})
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        if key.startswith("task."):
            task_section[key.removeprefix("task.")] = value
        else:
            training[key] = value
    named = task_section.pop("task", task)
    if named != task:
        raise ValueError(f"The config is for task {named!r} but --task is {task!r}.")
    return TaskConfig.from_dict({"task": task, **task_section}), FinetuningArgs.from_dict(training)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; anything after them is a ``key=value`` override."""
    from cellfoundry.tasks.base import TASKS

    parser = argparse.ArgumentParser(
        prog="finetune", description="Fine-tune a pretrained encoder for a task."
    )
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--config", help="YAML with task and training sections")
    parser.add_argument("--data", help=".h5ad with raw counts; overrides training.data")
    parser.add_argument("--output_dir", help="overrides training.output_dir")
    parser.add_argument("--max_steps", type=int, help="overrides training.max_steps")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="'latest' or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. task.tuning=full")
    return parser.parse_args(argv)


def finetune_main(argv: list[str] | None = None) -> int:
    """Fine-tune, then print where the model went and its test scores."""
    import cellfoundry.tasks  # noqa: F401 - registers the tasks for --task choices

    options = parse_args(argv)
    configure_logging()
    try:
        overrides = collect_overrides(options)
        config, args = load_finetuning_config(options.config, options.task, overrides)
        if not args.data:
            raise ValueError("No data: pass --data cells.h5ad or set training.data.")
        from cellfoundry.tasks.finetune import run_finetuning

        result = run_finetuning(config, args)
    except ValueError as error:  # a config or data problem: the message says the fix
        print(f"error: {error}", file=sys.stderr)
        return 2
    scores = {k: round(v, 4) for k, v in result.test_metrics.items() if isinstance(v, float)}
    print(f"Finished at step {result.steps}; task model saved in {result.output_dir}")
    print("Test:", scores)
    return 0
