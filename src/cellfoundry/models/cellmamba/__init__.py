"""CellMamba: bidirectional Mamba-2 (SSD) encoder in pure PyTorch, mamba_ssm kernel optional."""

from .configuration_cellmamba import CellMambaConfig
from .modeling_cellmamba import (
    CellMambaForMaskedGeneModeling,
    CellMambaModel,
    CellMambaPreTrainedModel,
)

__all__ = [
    "CellMambaConfig",
    "CellMambaForMaskedGeneModeling",
    "CellMambaModel",
    "CellMambaPreTrainedModel",
]
