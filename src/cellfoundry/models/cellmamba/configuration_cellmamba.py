"""Architecture config of CellMamba, the bidirectional Mamba-2 (SSD) encoder."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict

from .._shared import CellEncoderConfig
from .ssd import SSD_IMPLEMENTATIONS


@strict
class CellMambaConfig(CellEncoderConfig):
    """Sizes of a stack of bidirectional Mamba-2 mixer blocks.

    Inherits the vocabulary, position, dropout and tokenizer fields of
    :class:`~cellfoundry.models._shared.CellEncoderConfig`. Each block is pre-LayerNorm
    ``x + mixer(LN(x))``; the mixer scans the cell forwards and backwards (see
    :class:`~cellfoundry.models.cellmamba.modeling_cellmamba.CellMambaMixer`).

    Parameters
    ----------
    state_size : int
        N, the state width per head (Mamba-2 default 64-128).
    head_dim : int
        P, channels per SSD head. Heads per direction ``num_heads = expand * hidden_size /
        head_dim``.
    expand : int
        Inner width multiplier: the mixer works at ``expand * hidden_size`` channels.
    n_groups : int
        Groups of heads sharing the B and C projections (like grouped-query attention).
    conv_kernel : int
        Width of the causal depthwise convolution before the scan.
    chunk_size : int
        Chunk length T of the chunked scan; 64 balances the (T, T) intra-chunk matmuls
        against the number of chunks on CPU; use 128-256 with the ``mamba_ssm`` kernel.
    time_step_min, time_step_max, time_step_floor : float
        Range of the initial step sizes ``dt`` (log-uniform), as in Mamba-2.
    a_init_min, a_init_max : float
        Range of the initial decay rates ``-A`` (uniform), as in Mamba-2.
    ssd_implementation : {"auto", "torch", "mamba_ssm", "sequential"}
        Which scan :func:`~cellfoundry.models.cellmamba.ssd.ssd_scan` runs; ``auto`` uses
        the ``mamba_ssm`` kernel on CUDA when installed and the PyTorch chunked scan
        otherwise. Checkpoints are identical whatever the choice.
    """

    model_type = "cellfoundry-mamba"

    state_size: int = 64
    head_dim: int = 32
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    a_init_min: float | int = 1.0
    a_init_max: float | int = 16.0
    ssd_implementation: str = "auto"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        inner = self.expand * self.hidden_size
        if self.head_dim <= 0 or inner % self.head_dim:
            raise ValueError(
                f"expand * hidden_size ({inner}) must be a multiple of head_dim "
                f"({self.head_dim}); change head_dim, expand or hidden_size."
            )
        if self.n_groups <= 0 or self.num_heads % self.n_groups:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})."
            )
        if self.ssd_implementation not in SSD_IMPLEMENTATIONS:
            raise ValueError(
                f"ssd_implementation={self.ssd_implementation!r}; use one of {SSD_IMPLEMENTATIONS}."
            )
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ValueError(
                f"Need 0 < a_init_min <= a_init_max, got {self.a_init_min}, {self.a_init_max}."
            )

    @property
    def intermediate_size(self) -> int:
        """Inner width of the mixer, ``expand * hidden_size``."""
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        """SSD heads per direction."""
        return self.intermediate_size // self.head_dim
