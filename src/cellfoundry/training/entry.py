"""Command-line entry for masked-gene pretraining, shared by the script and the CLI.

``pretraining/pretrain_mgm.py`` and ``cellfoundry pretrain`` both call :func:`pretrain_main`,
so the two accept the same options.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cellfoundry.training.args import load_pretraining_config, parse_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; anything after them is a ``key=value`` override."""
    parser = argparse.ArgumentParser(
        prog="pretrain_mgm", description="Masked-gene pretraining from a YAML run config."
    )
    parser.add_argument("--config", required=True, help="YAML with model and training sections")
    parser.add_argument("--data", nargs="+", help="tokenized folder(s); overrides training.data")
    parser.add_argument("--output_dir", help="overrides training.output_dir")
    parser.add_argument("--max_steps", type=int, help="overrides training.max_steps")
    parser.add_argument(
        "--resume", metavar="CHECKPOINT", help="'latest' or a checkpoint folder to continue from"
    )
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model.hidden_size=128")
    return parser.parse_args(argv)


def configure_logging() -> None:
    """INFO logs with timestamps for training scripts; accelerate's per-file lines muted."""
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file


def collect_overrides(options: argparse.Namespace) -> dict:
    """``key=value`` overrides plus the named options (``--data``, ``--output_dir``, ...) given."""
    named = {
        "data": options.data,
        "output_dir": options.output_dir,
        "max_steps": options.max_steps,
        "resume_from_checkpoint": options.resume,
    }
    overrides = parse_overrides(options.overrides)
    overrides.update({key: value for key, value in named.items() if value is not None})
    return overrides


def pretrain_main(argv: list[str] | None = None) -> int:
    """Run pretraining and print where the model went."""
    options = parse_args(argv)
    configure_logging()
    try:
        overrides = collect_overrides(options)
        model_spec, args = load_pretraining_config(options.config, overrides)
        from cellfoundry.training.loop import run_pretraining

        result = run_pretraining(model_spec, args)
    except ValueError as error:  # a config or data problem: the message says the fix
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.is_main_process:
        print(f"Finished at step {result.step}; model saved in {result.output_dir}")
        if result.eval_metrics:
            print("Held-out:", {k: round(v, 4) for k, v in result.eval_metrics.items()})
    return 0
