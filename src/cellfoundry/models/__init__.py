"""cellfoundry encoders as plain Hugging Face models, registered with the Auto classes.

Importing this package registers ``cellfoundry-bert`` and ``cellfoundry-mamba`` with
``AutoConfig``, ``AutoModel`` and ``AutoModelForMaskedLM``, so a saved checkpoint loads with
``AutoModel.from_pretrained(path)`` and no ``trust_remote_code``. transformers cannot find
these classes on its own (a ``model_type`` it does not know, and we never ship remote code),
so the registration must run first: ``import cellfoundry.models`` or call
:func:`load_model`, which does both. ``import cellfoundry`` itself stays torch-free and
exposes this package lazily.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel

from ._shared import (
    IGNORE_INDEX,
    CellEncoderConfig,
    check_tokenizer_compatible,
    pool_hidden_states,
)
from .cellbert import CellBertConfig, CellBertForMaskedGeneModeling, CellBertModel
from .cellmamba import CellMambaConfig, CellMambaForMaskedGeneModeling, CellMambaModel

MODEL_CLASSES: dict[str, tuple[type, type, type]] = {
    CellBertConfig.model_type: (CellBertConfig, CellBertModel, CellBertForMaskedGeneModeling),
    CellMambaConfig.model_type: (CellMambaConfig, CellMambaModel, CellMambaForMaskedGeneModeling),
}
"""model_type -> (config class, encoder class, masked-gene class)."""


def register_auto_classes() -> None:
    """Register both model types with the transformers Auto classes (idempotent)."""
    for model_type, (config_class, model_class, mgm_class) in MODEL_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForMaskedLM.register(config_class, mgm_class, exist_ok=True)


def load_model(
    name_or_path: str, *, masked_gene_head: bool = False, **kwargs: Any
) -> PreTrainedModel:
    """Load a cellfoundry checkpoint (folder or Hub id) as the encoder or with its MGM head.

    Parameters
    ----------
    name_or_path : str
        Shipped name (``cellfoundry-tiny-bert``), folder written by ``save_pretrained``, or
        a Hub repository id.
    masked_gene_head : bool
        Return the ``...ForMaskedGeneModeling`` class (pretraining, gene prediction) instead
        of the bare encoder (embeddings, fine-tuning).
    **kwargs
        Passed to ``from_pretrained``, e.g. ``attn_implementation="sdpa"``, ``dtype``.

    Returns
    -------
    PreTrainedModel
        A ``CellBert*`` or ``CellMamba*`` model, chosen by the checkpoint's ``model_type``.
    """
    from cellfoundry.hub import resolve_model

    register_auto_classes()
    auto_class = AutoModelForMaskedLM if masked_gene_head else AutoModel
    return auto_class.from_pretrained(resolve_model(name_or_path), **kwargs)


register_auto_classes()

__all__ = [
    "IGNORE_INDEX",
    "MODEL_CLASSES",
    "CellBertConfig",
    "CellBertForMaskedGeneModeling",
    "CellBertModel",
    "CellEncoderConfig",
    "CellMambaConfig",
    "CellMambaForMaskedGeneModeling",
    "CellMambaModel",
    "check_tokenizer_compatible",
    "load_model",
    "pool_hidden_states",
    "register_auto_classes",
]
