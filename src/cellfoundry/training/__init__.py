"""Training: run settings (``args``), optimizer and schedule (``optim``), the one loop (``loop``).

``run_pretraining(model_spec, args)`` is what ``pretraining/pretrain_mgm.py`` calls and
``cellfoundry.tasks.run_finetuning`` what ``finetuning/finetune.py`` calls; :func:`train` is
the loop both share.
"""

from cellfoundry.training.args import (
    RUN_ARGS_FILE,
    FinetuningArgs,
    PretrainingArgs,
    TrainingArgs,
    load_pretraining_config,
    model_config_kwargs,
    parse_overrides,
    resolve_mixed_precision,
)
from cellfoundry.training.loop import (
    LOG_FILE,
    TrainerState,
    TrainResult,
    build_masked_gene_model,
    create_accelerator,
    evaluate,
    export_model,
    find_checkpoint,
    make_dataloader,
    masked_gene_counts,
    read_log,
    run_pretraining,
    save_checkpoint,
    train,
)
from cellfoundry.training.optim import build_optimizer, build_scheduler, parameter_groups

__all__ = [
    "LOG_FILE",
    "RUN_ARGS_FILE",
    "FinetuningArgs",
    "PretrainingArgs",
    "TrainingArgs",
    "TrainResult",
    "TrainerState",
    "build_masked_gene_model",
    "build_optimizer",
    "build_scheduler",
    "create_accelerator",
    "evaluate",
    "export_model",
    "find_checkpoint",
    "load_pretraining_config",
    "make_dataloader",
    "masked_gene_counts",
    "model_config_kwargs",
    "parameter_groups",
    "parse_overrides",
    "read_log",
    "resolve_mixed_precision",
    "run_pretraining",
    "save_checkpoint",
    "train",
]
