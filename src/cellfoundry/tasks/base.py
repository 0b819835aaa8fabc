"""What every downstream task shares: its config, the task model, its saved form, a registry.

A task model is ``TaskModel(backbone, pooler, head)``: a pretrained encoder (CellBert or
CellMamba, optionally wrapped with LoRA adapters by peft), a pooling of its token vectors into
one vector per cell, and a small task head, always the attribute ``head``. Heads see pooled
cell vectors (gene-pair heads: token vectors), so each is written once for every backbone.

Saved form (one folder, loadable with :func:`load_task_model`):

``task_config.json``
    The :class:`TaskConfig` subclass's fields (task name, base model, labels, what trained).
``head.safetensors``
    The head's weights.
``adapter_config.json`` + ``adapter_model.safetensors``
    LoRA adapters (peft's format), when ``tuning == "lora"``.
``backbone.safetensors`` + ``backbone_config.json``
    The whole fine-tuned encoder, when ``tuning == "full"``. With ``linear_probe`` the
    encoder is the base model unchanged and is not saved.
``README.md``
    A model card with the task's test metrics beside the baselines.

Tensor shape glossary: B cells, L tokens, D hidden size, K classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.utils import ModelOutput

from cellfoundry._io import atomic_write_text

logger = logging.getLogger(__name__)

TASK_CONFIG_FILE = "task_config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
TUNING_MODES = ("lora", "full", "linear_probe")
POOLINGS = ("cls", "mean")


@dataclass
class TaskConfig:
    """A task head and how it is trained on top of a pretrained encoder (``task_config.json``).

    Parameters
    ----------
    task : str
        Registry name (``annotation``, ``integration``, ...); set by each subclass.
    base_model : str
        The pretrained encoder: shipped name, folder or Hub id.
    tuning : {"lora", "full", "linear_probe"}
        What trains besides the head: LoRA adapters on the encoder's projections, every
        encoder weight, or nothing (the encoder is frozen: a probe of its embeddings).
    pooling : {"cls", "mean"}
        How token vectors become one cell vector (``pool_hidden_states``).
    lora_r, lora_alpha, lora_dropout : int, int, float
        LoRA rank, scale numerator and input dropout (``tuning == "lora"``).
    lora_targets : list of str or None
        Module-name suffixes to adapt; ``None`` uses ``DEFAULT_LORA_TARGETS``.
    lora_freeze_a : bool
        LoRA-FA (Zhang et al. 2023): every ``A`` stays at its random initialisation and only
        ``B`` trains. An adapted layer's input is then needed by no weight gradient (``B``'s
        needs ``A``'s r-wide output), so backward keeps fewer activations
        (``benchmarks/results/finetune_memory.md``). Only with ``tuning == "lora"``.
    head_hidden_size : int
        Hidden width of a two-layer head; 0 makes the head one linear layer.
    head_dropout : float
        Dropout on the pooled vector before the head.
    encoder_dropout : float or None
        Dropout inside the encoder while fine-tuning (``lora``/``full``); ``None`` keeps the
        pretrained config's. Default 0: a tiny encoder's cells differ by little in its pooled
        vectors (per-feature sd ~0.02 at norm ~11 on STARmap), and its pretraining dropout
        (0.1) buries that signal; with it, LoRA's training loss stayed at chance level.
    whitening_ridge : float or None
        Ridge of the head's fixed ZCA whitening, as a fraction of the mean eigenvalue
        (:mod:`cellfoundry.tasks.heads`); ``None`` only centres. 0.01 suits LoRA and probes.
        Full fine-tuning moves every weight, and the whitening amplifies those changes: on
        STARmap the training loss rose above chance (3.1-4.2 against ln 15 = 2.7) at
        learning rates 3e-6 to 5e-5; without whitening it stayed at chance. Train the head
        alone first (``head_only_steps``, finetuning/README.md).
    max_length : int or None
        Tokens per cell; ``None`` uses the encoder's context length.
    metrics : dict
        Filled after training: test-set figures beside the baselines, for the card.
    """

    task: ClassVar[str] = ""
    base_model: str = "cellfoundry-tiny-bert"
    tuning: str = "lora"
    pooling: str = "cls"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    lora_freeze_a: bool = False
    head_hidden_size: int = 0
    head_dropout: float = 0.1
    encoder_dropout: float | None = 0.0
    whitening_ridge: float | None = 0.01
    max_length: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tuning not in TUNING_MODES:
            raise ValueError(f"tuning={self.tuning!r}; use one of {TUNING_MODES}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; use one of {POOLINGS}.")
        if self.lora_freeze_a and self.tuning != "lora":
            raise ValueError(
                f"lora_freeze_a=true freezes LoRA's A matrices, but tuning={self.tuning!r} has "
                "none; set tuning: lora, or drop lora_freeze_a."
            )
        if self.lora_r <= 0 or self.head_hidden_size < 0:
            raise ValueError(
                f"lora_r must be positive and head_hidden_size >= 0; got {self.lora_r} and "
                f"{self.head_hidden_size}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **dataclasses.asdict(self)}

    def save(self, folder: str | Path) -> Path:
        """Write ``task_config.json`` atomically."""
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        return atomic_write_text(Path(folder) / TASK_CONFIG_FILE, text)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskConfig:
        """Build the registered subclass named by ``values["task"]``, naming unknown keys."""
        values = dict(values)
        task = values.pop("task", cls.task)
        config_class = get_task(task).config_class if task else cls
        known = {item.name for item in dataclasses.fields(config_class)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown {task or 'task'} config field(s) {unknown}; valid fields: "
                f"{sorted(known)}."
            )
        return config_class(**values)

    @classmethod
    def load(cls, folder: str | Path) -> TaskConfig:
        """Read ``task_config.json`` from a fine-tuned model folder."""
        path = Path(folder) / TASK_CONFIG_FILE
        if not path.is_file():
            raise ValueError(
                f"{folder} is not a fine-tuned task model ({TASK_CONFIG_FILE} missing); "
                "train one with `cellfoundry finetune`."
            )
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class TaskOutput(ModelOutput):
    """What a task model returns.

    Attributes
    ----------
    loss : torch.Tensor or None
        Scalar training loss (when targets were given).
    logits : torch.Tensor or None
        (B, K) class scores (classification tasks).
    embeddings : torch.Tensor or None
        (B, D') the task's cell representation (e.g. the integrated embedding).
    predictions : torch.Tensor or None
        (B, P, G) regression outputs (the perturbation task's predicted change of expression
        per perturbation and gene).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


class TaskModel(nn.Module):
    """``backbone`` -> pool -> ``head``; one class for every backbone and task.

    Parameters
    ----------
    backbone : nn.Module
        A cellfoundry encoder (``CellBertModel`` / ``CellMambaModel``) or a peft model
        wrapping one.
    config : TaskConfig
        Pooling and tuning mode (``linear_probe`` runs the encoder without gradients).
    head : nn.Module
        ``head(cell_vectors, **targets) -> TaskOutput``.
    """

    def __init__(self, backbone: nn.Module, config: TaskConfig, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.head = head

    def encode_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) tokens -> (B, L, D) contextual token vectors (no gradient when probing)."""
        frozen = self.config.tuning == "linear_probe"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, context_ids=context_ids
            ).last_hidden_state

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) tokens -> (B, D) pooled cell vectors."""
        from cellfoundry.models import pool_hidden_states

        hidden = self.encode_tokens(input_ids, attention_mask, context_ids)
        return pool_hidden_states(hidden, attention_mask, self.config.pooling)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        **targets: torch.Tensor,
    ) -> TaskOutput:
        """Pool the encoder's output and apply the head (with a loss when targets are given).

        A head with ``reads_tokens = True`` (gene-pair heads) gets the token vectors, the ids
        and the mask instead of pooled cell vectors.
        """
        if getattr(self.head, "reads_tokens", False):
            hidden = self.encode_tokens(input_ids, attention_mask, context_ids)
            return self.head(hidden, input_ids=input_ids, attention_mask=attention_mask, **targets)
        return self.head(self.encode(input_ids, attention_mask, context_ids), **targets)

    def train(self, mode: bool = True) -> TaskModel:
        """As ``nn.Module.train``, but a probed (frozen) encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.config.tuning == "linear_probe":
            self.backbone.eval()
        return self

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Recompute the encoder's layers in backward (the head is tiny)."""
        target = self.backbone
        if hasattr(target, "get_base_model"):
            target = target.get_base_model()
        target.gradient_checkpointing_enable(**kwargs)

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, state_dict: Any = None, **_: Any) -> None:
        """Write the task folder (see the module docstring); only what trained is saved.

        ``state_dict`` (what the training loop passes) is not needed: on one process or DDP
        the modules hold the weights. Sharded FSDP/DeepSpeed runs would need it; fine-tuning
        models of this size does not shard.
        """
        from safetensors.torch import save

        from cellfoundry.tasks.card import write_task_card

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Everything is written into a staging folder first and then renamed file by file,
        # so an interrupted save never leaves a half-written file (peft writes in place).
        staging = Path(tempfile.mkdtemp(prefix=".task-", dir=folder))
        try:
            if self.config.tuning == "lora":
                self.backbone.save_pretrained(str(staging))
            elif self.config.tuning == "full":
                weights = {k: v.contiguous() for k, v in self.backbone.state_dict().items()}
                (staging / BACKBONE_FILE).write_bytes(save(weights))
                config_text = self.backbone.config.to_json_string()
                (staging / BACKBONE_CONFIG_FILE).write_text(config_text)
            head = {k: v.contiguous() for k, v in self.head.state_dict().items()}
            (staging / HEAD_FILE).write_bytes(save(head))
            self.config.save(staging)
            write_task_card(self, staging)
            for path in staging.iterdir():
                path.chmod(0o644)  # peft and mkstemp create 0600 files; outputs are shared
                os.replace(path, folder / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class Task:
    """A registered task: its config class, head, data targets and evaluation.

    Subclasses set ``name`` and ``config_class`` and implement the class methods; the
    fine-tuning runner and ``predict`` only talk to this interface.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TaskConfig]] = TaskConfig

    @classmethod
    def build_head(cls, config: TaskConfig, hidden_size: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def evaluate(cls, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Validation figures logged during training (``eval_*`` keys)."""
        raise NotImplementedError

    @classmethod
    @torch.no_grad()
    def prepare_head(cls, model: nn.Module, loader: Any) -> None:
        """Fit what the head derives from the training cells before training: by default its
        ``whitening`` (:class:`~cellfoundry.tasks.heads.FixedWhitening`), from the training
        cells' vectors under the starting encoder. ``loader`` yields collated batches."""
        whitening = getattr(model.head, "whitening", None)
        if whitening is None:
            return
        model.eval()
        inputs = ("input_ids", "attention_mask", "context_ids")
        vectors = [model.encode(**{k: b[k] for k in inputs if k in b}) for b in loader]
        whitening.fit(torch.cat(vectors), ridge=model.config.whitening_ridge)
        model.train()

    @classmethod
    def head_inputs(cls, adata: Any, model: nn.Module, **options: Any) -> dict[str, Any]:
        """Per-cell head inputs besides the pooled vector, for :func:`predict` (default none;
        the niche task's neighbour vectors). Arrays with one row per cell of ``adata``."""
        return {}

    @classmethod
    def write_predictions(
        cls, adata: Any, config: TaskConfig, outputs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Write head outputs (``valid`` rows, ``logits``/``embeddings``) into ``adata``."""
        raise NotImplementedError

    @classmethod
    def check_score_labels(cls, adata: Any, config: TaskConfig, label_key: str) -> None:
        """Fail before predicting if ``adata`` cannot be scored against ``obs[label_key]``."""
        if label_key not in adata.obs.columns:
            raise ValueError(
                f"No obs column {label_key!r} to score the predictions against (columns: "
                f"{list(adata.obs.columns)}); pass the column holding the true labels."
            )

    @classmethod
    def score_predictions(
        cls, adata: Any, config: TaskConfig, written: Mapping[str, Any], label_key: str
    ) -> dict[str, float]:
        """Figures of what ``predict`` wrote, against the true labels in ``obs[label_key]``."""
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Class decorator: make ``task`` available by ``task.name``."""
    if not task.name:
        raise ValueError(f"{task.__name__} has no name; set the class attribute `name`.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> type[Task]:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {sorted(TASKS)}.")
    return TASKS[name]


# -- building and loading ------------------------------------------------------------------
def set_encoder_dropout(backbone: nn.Module, probability: float) -> None:
    """Set every dropout of the encoder (modules and attention-probability dropout) to ``p``."""
    for module in backbone.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = probability


def prepare_backbone(backbone: nn.Module, config: TaskConfig) -> nn.Module:
    """Apply the tuning mode: wrap with LoRA adapters, train everything, or freeze."""
    if config.encoder_dropout is not None:
        set_encoder_dropout(backbone, config.encoder_dropout)
    if config.tuning == "lora":
        from cellfoundry.adapters import add_lora

        return add_lora(
            backbone,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_targets,
            modules_to_save=[],
            freeze_a=config.lora_freeze_a,
        )
    backbone.requires_grad_(config.tuning == "full")
    return backbone


def build_task_model(config: TaskConfig, backbone: nn.Module | None = None) -> TaskModel:
    """A fresh task model: the base encoder (loaded unless given), tuned as configured, and a
    new head."""
    from cellfoundry.models import load_model

    if backbone is None:
        backbone = load_model(config.base_model, masked_gene_head=False)
    head = get_task(config.task).build_head(config, backbone.config.hidden_size)
    return TaskModel(prepare_backbone(backbone, config), config, head)


def load_task_model(folder: str | Path, device: str | torch.device | None = None) -> TaskModel:
    """Load a fine-tuned task model saved by :meth:`TaskModel.save_pretrained` (eval mode)."""
    from safetensors.torch import load_file

    from cellfoundry.models import MODEL_CLASSES, load_model

    folder = Path(folder)
    config = TaskConfig.load(folder)
    if config.tuning == "full":
        settings = json.loads((folder / BACKBONE_CONFIG_FILE).read_text())
        config_class, model_class, _ = MODEL_CLASSES[settings["model_type"]]
        backbone = model_class(config_class.from_dict(settings))
        _load_weights(backbone, load_file(folder / BACKBONE_FILE), folder / BACKBONE_FILE)
    else:
        backbone = load_model(config.base_model, masked_gene_head=False)
    if config.tuning == "lora":
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, str(folder))
    head = get_task(config.task).build_head(config, backbone.config.hidden_size)
    _load_weights(head, load_file(folder / HEAD_FILE), folder / HEAD_FILE)
    model = TaskModel(backbone, config, head).eval()
    return model.to(device) if device is not None else model


def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` that names the file when keys or shapes do not match."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not match the model it belongs to ({str(error).splitlines()[0]}); "
            "the folder is corrupt or mixes files of two runs: fine-tune again."
        ) from error
