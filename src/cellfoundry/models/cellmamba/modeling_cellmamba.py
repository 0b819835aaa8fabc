"""CellMamba: a bidirectional Mamba-2 (SSD) encoder over ranked gene tokens.

A cell is a set of genes ordered by relative expression, so every token should see every
other: each mixer scans the cell forwards and backwards. The backward scan runs on the cell
reversed *within its valid length* (right padding stays at the end), so with right-padded
batches no real token ever reads a padding token in either direction, and outputs at real
tokens do not depend on how much padding follows.

Both directions share ``in_proj`` and ``out_proj`` (half the parameters of two mixers, as in
Caduceus' weight-tied BiMamba); they keep their own convolution, step sizes, decays and skip
weights. The two directions run as one SSD call with 2H heads: direction-specific heads and
B/C groups are stacked, so the scan kernel sees an ordinary Mamba-2 input.

Tensor shape glossary: B batch, L tokens, D hidden, I = expand * D inner, H heads per
direction, P head dim, G groups, N state size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .._shared import (
    CellEmbeddings,
    CellEncoderMixin,
    MaskedGeneHead,
    MaskedGeneModelingMixin,
    ModelCardMixin,
    run_layers,
)
from .configuration_cellmamba import CellMambaConfig
from .ssd import ssd_scan


def valid_length_flip_index(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Gather index that reverses each sequence within its valid length.

    Position ``i < n`` maps to ``n - 1 - i`` and padding positions ``i >= n`` to themselves,
    so padding stays at the end after the flip. The index is its own inverse.

    Parameters
    ----------
    attention_mask : torch.Tensor or None
        (B, L), right-padded (1s then 0s); ``None`` means no padding.
    batch, length : int
        B and L.
    device : torch.device
        Where to build the index.

    Returns
    -------
    torch.Tensor
        (B, L) long.
    """
    positions = torch.arange(length, device=device).expand(batch, length)
    if attention_mask is None:
        return positions.flip(-1).contiguous()
    lengths = attention_mask.sum(dim=1, keepdim=True).to(torch.long)
    return torch.where(positions < lengths, lengths - 1 - positions, positions)


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Raise unless every row of ``attention_mask`` (B, L) is 1s followed by 0s."""
    length = attention_mask.shape[1]
    lengths = attention_mask.sum(dim=1, keepdim=True)
    expected = torch.arange(length, device=attention_mask.device) < lengths
    if not torch.equal(attention_mask.to(torch.bool), expected):
        raise ValueError(
            "CellMamba needs right-padded batches (real tokens first, padding last) because "
            "its backward scan reverses each cell within its valid length; pad on the right "
            "(the cellfoundry collators do) instead of the left or in the middle."
        )


def flip_tokens(tensor: torch.Tensor, flip_index: torch.Tensor) -> torch.Tensor:
    """Reorder the tokens of a (B, L, ...) tensor by a (B, L) per-row index.

    Done as one ``index_select`` of whole token rows (a memcpy each), several times faster
    on CPU than ``gather`` with an index expanded over every channel.
    """
    batch, length = flip_index.shape
    offsets = torch.arange(batch, device=flip_index.device).unsqueeze(1) * length
    rows = tensor.reshape(batch * length, *tensor.shape[2:])
    return rows.index_select(0, (flip_index + offsets).reshape(-1)).view(tensor.shape)


class _CausalDepthwiseConv(torch.autograd.Function):
    """``out[t] = bias + sum_k taps[:, k] * x[t - K + 1 + k]`` on token-major (B, L, C) tensors,
    with its backward written out.

    Why by hand: with K = 4 the K fused multiply-adds stay in token-major memory (no
    transposes), where on CPU the depthwise ``convolution_backward`` cost about a quarter of a
    CellMamba training step. Left to autograd, the same products cost a zero-filled, padded copy
    per tap in backward (``slice_backward``); here each gradient is K products on shifted
    views, with no padding in either direction.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None):
        kernel, length = taps.shape[-1], tensor.shape[1]
        out = tensor * taps[:, -1]
        if bias is not None:
            out = out + bias
        for k in range(max(0, kernel - length), kernel - 1):
            shift = kernel - 1 - k  # tap k reads the token `shift` places back (< length)
            out[:, shift:].addcmul_(tensor[:, : length - shift], taps[:, k])
        ctx.save_for_backward(tensor, taps)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        tensor, taps = ctx.saved_tensors
        kernel, length = taps.shape[-1], tensor.shape[1]
        grad_input = grad_taps = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad * taps[:, -1]
            for k in range(max(0, kernel - length), kernel - 1):
                shift = kernel - 1 - k
                grad_input[:, : length - shift].addcmul_(grad[:, shift:], taps[:, k])
        if ctx.needs_input_grad[1]:
            grad_taps = taps.new_zeros(taps.shape)
            for k in range(max(0, kernel - length), kernel):
                shift = kernel - 1 - k
                product = grad[:, shift:] * tensor[:, : length - shift]
                grad_taps[:, k] = product.sum(dim=(0, 1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 1))
        return grad_input, grad_taps, grad_bias


def causal_depthwise_conv(
    tensor: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Causal depthwise convolution of a token-major (B, L, C) tensor, as K shifted products.

    Equal to ``nn.Conv1d(C, C, K, groups=C, padding=K - 1)`` on the channel-major transpose,
    truncated to the first L outputs (``out[t] = bias + sum_k w[k] * x[t - K + 1 + k]``), in
    values and gradients; see :class:`_CausalDepthwiseConv` for why it is written out.

    Parameters
    ----------
    tensor : torch.Tensor
        (B, L, C) inputs.
    weight : torch.Tensor
        (C, 1, K) ``Conv1d`` weights (the module keeps them, so checkpoints are unchanged).
    bias : torch.Tensor or None
        (C,) or ``None``.
    """
    taps = weight[:, 0, :].to(tensor.dtype)  # (C, K)
    bias = bias.to(tensor.dtype) if bias is not None else None
    return _CausalDepthwiseConv.apply(tensor, taps, bias)


class CellMambaGatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)``: Mamba-2's output gate, normalised for stable depth."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Gate then normalise (B, L, I) -> (B, L, I), in float32 for half inputs."""
        dtype = hidden_states.dtype
        gated = hidden_states.float() * nn.functional.silu(gate.float())
        scale = torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (gated * scale).to(dtype) * self.weight


class CellMambaMixer(nn.Module):
    """Bidirectional Mamba-2 mixer (SSD with a scalar decay per head).

    ``in_proj`` gives the gate z (I), the conv input xBC (I + 2GN) and one step size per
    head and direction (2H). Forward and valid-length-flipped copies of xBC go through one
    depthwise causal convolution (2 x (I + 2GN) channels, each direction its own filters),
    then one SSD scan with 2H heads.
    The backward half is flipped back, both halves are summed, gated, normalised and
    projected by ``out_proj``.
    """

    def __init__(self, config: CellMambaConfig) -> None:
        super().__init__()
        self.inner = config.intermediate_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.groups = config.n_groups
        self.state_size = config.state_size
        self.chunk_size = config.chunk_size
        self.ssd_implementation = config.ssd_implementation
        self.conv_width = self.inner + 2 * self.groups * self.state_size
        projected = self.inner + self.conv_width + 2 * self.num_heads
        self.in_proj = nn.Linear(config.hidden_size, projected, bias=False)
        channels = 2 * self.conv_width
        self.conv1d = nn.Conv1d(
            channels, channels, config.conv_kernel, groups=channels, padding=config.conv_kernel - 1
        )
        # One value per head and direction: [forward heads, backward heads].
        self.A_log = nn.Parameter(torch.zeros(2 * self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(2 * self.num_heads))
        self.D = nn.Parameter(torch.ones(2 * self.num_heads))
        self.norm = CellMambaGatedRMSNorm(self.inner, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, flip_index: torch.Tensor) -> torch.Tensor:
        """Mix (B, L, D) -> (B, L, D) in both directions.

        Parameters
        ----------
        hidden_states : torch.Tensor
            (B, L, D) normalised block input.
        flip_index : torch.Tensor
            (B, L) from :func:`valid_length_flip_index`, computed once per forward.
        """
        batch, length, _ = hidden_states.shape
        gate, xbc, dt = self.in_proj(hidden_states).split(
            [self.inner, self.conv_width, 2 * self.num_heads], dim=-1
        )
        conv_out = causal_depthwise_conv(
            self._conv_input(xbc, flip_index), self.conv1d.weight, self.conv1d.bias
        )
        conv_out = nn.functional.silu(conv_out)
        width = self.groups * self.state_size
        x, B, C = conv_out.split([2 * self.inner, 2 * width, 2 * width], dim=-1)
        x = x.reshape(batch, length, 2 * self.num_heads, self.head_dim)
        B = B.reshape(batch, length, 2 * self.groups, self.state_size)
        C = C.reshape(batch, length, 2 * self.groups, self.state_size)
        dt = nn.functional.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        y = ssd_scan(x, dt, A, B, C, self.chunk_size, self.ssd_implementation)
        y = y + x * self.D.unsqueeze(-1).to(x.dtype)
        forward_y, backward_y = y.split(self.num_heads, dim=2)
        y = forward_y + flip_tokens(backward_y, flip_index)
        y = self.norm(y.reshape(batch, length, self.inner), gate)
        return self.out_proj(y)

    def _conv_input(self, xbc: torch.Tensor, flip_index: torch.Tensor) -> torch.Tensor:
        """(B, L, I+2GN) -> (B, L, 2(I+2GN)) as [x_f, x_b, B_f, B_b, C_f, C_b].

        Interleaving the directions per part (one copy) makes x, B and C of both directions
        contiguous channel ranges after the convolution, so they split by views; forward
        heads and groups come first.
        """
        # ``split`` rather than slices: its backward is one ``cat``, where each slice's is a
        # zero-filled copy of the whole input.
        widths = [self.inner, self.groups * self.state_size, self.groups * self.state_size]
        forward_parts = xbc.split(widths, dim=-1)
        backward_parts = flip_tokens(xbc, flip_index).split(widths, dim=-1)
        parts = [part for pair in zip(forward_parts, backward_parts, strict=True) for part in pair]
        return torch.cat(parts, dim=-1)


class CellMambaLayer(GradientCheckpointingLayer):
    """Pre-LN residual block ``x + dropout(mixer(LN(x)))``.

    Subclassing ``GradientCheckpointingLayer`` lets
    ``model.activation_checkpointing_enable()`` recompute this block in backward.
    """

    def __init__(self, config: CellMambaConfig) -> None:
        super().__init__()
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = CellMambaMixer(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, flip_index: torch.Tensor) -> torch.Tensor:
        """Transform (B, L, D) -> (B, L, D)."""
        return hidden_states + self.dropout(self.mixer(self.mixer_norm(hidden_states), flip_index))


class CellMambaPreTrainedModel(ModelCardMixin, PreTrainedModel):
    """Shared loading and Mamba-2 initialisation (decays, step sizes)."""

    config_class = CellMambaConfig
    config: CellMambaConfig
    base_model_prefix = "cellmamba"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CellMambaLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Mamba-2 initialisation: ``-A`` uniform in [a_init_min, a_init_max], ``dt``
        log-uniform in [time_step_min, time_step_max] (stored through inverse softplus),
        ``D`` = 1; everything else uses the transformers defaults."""
        super()._init_weights(module)
        if not isinstance(module, CellMambaMixer):
            return
        config = self.config
        heads = module.A_log.shape[0]
        decay = torch.empty(heads).uniform_(config.a_init_min, config.a_init_max)
        init.copy_(module.A_log, torch.log(decay))
        log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(heads) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=config.time_step_floor)
        init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        init.ones_(module.D)
        init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))


class CellMambaModel(CellEncoderMixin, CellMambaPreTrainedModel):
    """CellMamba encoder returning one vector per token.

    Parameters
    ----------
    config : CellMambaConfig
        Architecture.

    Examples
    --------
    >>> config = CellMambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
    ...                          head_dim=16, state_size=8, chunk_size=8)
    >>> model = CellMambaModel(config)
    >>> out = model(input_ids=torch.tensor([[2, 10, 11, 0]]),
    ...             attention_mask=torch.tensor([[1, 1, 1, 0]]))
    >>> out.last_hidden_state.shape
    torch.Size([1, 4, 32])
    """

    # Loading a masked-gene checkpoint as the bare encoder leaves its head unused, by design.
    _keys_to_ignore_on_load_unexpected = [r"^head\."]

    def __init__(self, config: CellMambaConfig) -> None:
        super().__init__(config)
        self.embeddings = CellEmbeddings(config)
        self.layers = nn.ModuleList(
            [CellMambaLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutput:
        """Encode a right-padded batch of cells.

        Parameters
        ----------
        input_ids : torch.Tensor
            (B, L) long, ``<cls>`` then ranked gene tokens, right-padded.
        attention_mask : torch.Tensor or None
            (B, L), 1s then 0s; ``None`` means no padding.
        context_ids : torch.Tensor or None
            (B, C) long context tokens; pad id = absent.
        output_hidden_states : bool or None
            Also return the embedding output and every block's output.

        Returns
        -------
        BaseModelOutput
            ``last_hidden_state`` (B, L, D) after the final LayerNorm.

        Raises
        ------
        ValueError
            When ``attention_mask`` is not right-padded.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        batch, length = input_ids.shape
        if attention_mask is not None:
            check_right_padded(attention_mask)
        flip_index = valid_length_flip_index(attention_mask, batch, length, input_ids.device)
        hidden_states = self.embeddings(input_ids, context_ids)
        return run_layers(
            self.layers, hidden_states, flip_index, self.final_norm, output_hidden_states
        )


class CellMambaForMaskedGeneModeling(MaskedGeneModelingMixin, CellMambaPreTrainedModel):
    """CellMamba with the masked-gene head, the pretraining objective and checkpoint.

    The head's decoder is tied to the input embedding; logits are computed only where
    ``labels != -100``.

    Parameters
    ----------
    config : CellMambaConfig
        Architecture.
    """

    _tied_weights_keys = {"head.decoder.weight": "cellmamba.embeddings.word_embeddings.weight"}

    def __init__(self, config: CellMambaConfig) -> None:
        super().__init__(config)
        self.cellmamba = CellMambaModel(config)
        self.head = MaskedGeneHead(config)
        self.post_init()
