"""Downstream tasks on pretrained encoders: task heads, LoRA fine-tuning, prediction.

``TaskModel(backbone, pooler, head)`` is written once for every backbone; each task
(``annotation``, ``integration``, ``perturbation``, ``grn``, ``niche``) registers its config,
head, targets and scores in ``TASKS``.
``run_finetuning`` trains one (what ``cellfoundry finetune`` runs), ``load_task_model`` loads
it back in one call, and ``predict`` writes its output into an AnnData.
"""

from cellfoundry.tasks.annotation import AnnotationConfig, AnnotationTask, ClassificationHead
from cellfoundry.tasks.base import (
    TASKS,
    Task,
    TaskConfig,
    TaskModel,
    TaskOutput,
    build_task_model,
    get_task,
    load_task_model,
    register_task,
)
from cellfoundry.tasks.finetune import FinetuneResult, run_finetuning
from cellfoundry.tasks.grn import GRNConfig, GRNTask, PairHead, pair_classifier_edges
from cellfoundry.tasks.integration import IntegrationConfig, IntegrationHead, IntegrationTask
from cellfoundry.tasks.niche import NicheConfig, NicheHead, NicheTask
from cellfoundry.tasks.perturbation import PerturbationConfig, PerturbationTask, ResponseHead
from cellfoundry.tasks.predict import predict
from cellfoundry.tasks.splits import LabelSplit, make_split

__all__ = [
    "TASKS",
    "AnnotationConfig",
    "AnnotationTask",
    "ClassificationHead",
    "FinetuneResult",
    "GRNConfig",
    "GRNTask",
    "IntegrationConfig",
    "IntegrationHead",
    "IntegrationTask",
    "LabelSplit",
    "NicheConfig",
    "NicheHead",
    "NicheTask",
    "PairHead",
    "PerturbationConfig",
    "PerturbationTask",
    "ResponseHead",
    "Task",
    "TaskConfig",
    "TaskModel",
    "TaskOutput",
    "build_task_model",
    "get_task",
    "load_task_model",
    "make_split",
    "pair_classifier_edges",
    "predict",
    "register_task",
    "run_finetuning",
]
