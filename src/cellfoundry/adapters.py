"""LoRA adapters for cellfoundry encoders through peft.

Fine-tuning a pretrained encoder for a task usually means training low-rank adapters on its
projections plus the task head, and saving only those (megabytes instead of the checkpoint).
This module knows which projections to adapt for each backbone; peft does the rest.

Every projection named here is an ``nn.Linear`` (CellBert's attention is deliberately not
``nn.MultiheadAttention``, whose ``out_proj`` is called functionally and so receives no
LoRA gradient).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "cellfoundry-bert": ("query", "key", "value", "out_proj", "ffn_in", "ffn_out"),
    "cellfoundry-mamba": ("in_proj", "out_proj"),
}
"""Module-name suffixes adapted by default, per ``config.model_type``.

CellBert: all attention projections and both feed-forward layers (adapting the FFN as well
as attention is what makes LoRA match full fine-tuning on encoders). CellMamba: the input
and output projections of every mixer, which hold nearly all of its weights; the
convolution and per-head scalars are tiny and stay frozen.
"""


ATTENTION_LORA_TARGETS: tuple[str, ...] = ("query", "key", "value", "out_proj")
"""CellBert's attention projections only: the placement of the original LoRA paper.

With the feed-forward layers frozen, backward keeps no input of theirs for a weight gradient,
so a training step holds fewer activations than with ``DEFAULT_LORA_TARGETS``
(``benchmarks/results/finetune_memory.md``); its accuracy is in
``benchmarks/results/finetune_annotation.md`` (mode ``lora_attention``).
"""


def find_model_type(model: nn.Module) -> str:
    """The cellfoundry ``model_type`` of ``model`` or of the first sub-module that has one.

    Task models wrap a backbone (e.g. ``model.backbone``), so the search looks through
    sub-modules rather than requiring the top-level module to be a cellfoundry model.

    Raises
    ------
    ValueError
        When no sub-module has a ``config.model_type`` listed in ``DEFAULT_LORA_TARGETS``.
    """
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type in DEFAULT_LORA_TARGETS:
            return model_type
    raise ValueError(
        f"No cellfoundry backbone found in {type(model).__name__} (known model types: "
        f"{sorted(DEFAULT_LORA_TARGETS)}); pass target_modules=[...] explicitly."
    )


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    freeze_a: bool = False,
) -> PeftModel:
    """Freeze ``model`` and add trainable LoRA adapters (and a trainable head).

    Parameters
    ----------
    model : nn.Module
        A cellfoundry encoder, masked-gene model or task model containing one.
    r : int
        LoRA rank.
    alpha : int
        LoRA scaling numerator (the update is scaled by ``alpha / r``).
    dropout : float
        Dropout on the LoRA input.
    target_modules : sequence of str or None
        Module-name suffixes to adapt; ``None`` uses ``DEFAULT_LORA_TARGETS`` for the
        backbone's ``model_type``.
    modules_to_save : sequence of str or None
        Modules trained in full and saved with the adapter. ``None`` means ``["head"]`` when
        ``model`` has a ``head`` attribute (every cellfoundry task model and masked-gene
        model does), else nothing.
    freeze_a : bool
        LoRA-FA (Zhang et al. 2023): keep every ``A`` at its random initialisation and train
        only ``B``, so backward keeps no adapted layer's input for a weight gradient.

    Returns
    -------
    PeftModel
        Wrapping ``model``; only ``lora_*`` parameters and the saved modules require grad.
        Save with ``save_pretrained(folder)``; reload with
        ``PeftModel.from_pretrained(base_model, folder)``.
    """
    if target_modules is None:
        target_modules = DEFAULT_LORA_TARGETS[find_model_type(model)]
    if modules_to_save is None:
        modules_to_save = ["head"] if isinstance(getattr(model, "head", None), nn.Module) else []
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
    )
    peft_model = get_peft_model(model, config)
    if freeze_a:
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA r=%d on %s: %d of %d parameters train.", r, list(target_modules), trainable, total
    )
    return peft_model


def merge_lora(model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model.

    The merged model runs at the base model's speed and saves as an ordinary checkpoint;
    the adapters can no longer be removed from it.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"merge_lora expects a PeftModel (from add_lora), got {type(model).__name__}."
        )
    return model.merge_and_unload()
