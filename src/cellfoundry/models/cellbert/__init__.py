"""CellBert: bidirectional Transformer encoder (eager / sdpa / flash_attention_2)."""

from .configuration_cellbert import CellBertConfig
from .modeling_cellbert import (
    CellBertForMaskedGeneModeling,
    CellBertModel,
    CellBertPreTrainedModel,
)

__all__ = [
    "CellBertConfig",
    "CellBertForMaskedGeneModeling",
    "CellBertModel",
    "CellBertPreTrainedModel",
]
