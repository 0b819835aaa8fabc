"""CellBert: a bidirectional Transformer encoder over ranked gene tokens.

Pre-LayerNorm blocks (LayerNorm before attention and feed-forward, one final LayerNorm):
they train stably without warm-up tricks at the depths used here. Attention runs through
transformers' attention-function registry, so ``eager`` (reference), ``sdpa`` and
``flash_attention_2`` are the same module with a different kernel, and every projection is
a plain ``nn.Linear`` that LoRA can wrap.

Tensor shape glossary: B batch, L tokens, C context tokens, D hidden, H heads, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .._shared import (
    CellEmbeddings,
    CellEncoderMixin,
    MaskedGeneHead,
    MaskedGeneModelingMixin,
    ModelCardMixin,
    run_layers,
)
from .configuration_cellbert import CellBertConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax attention written out in matmuls.

    transformers registers only the fused kernels globally; each model supplies its own
    eager function, which is the readable reference the fused kernels are tested against.

    Parameters
    ----------
    module : nn.Module
        The calling attention module (for ``training``).
    query, key, value : torch.Tensor
        (B, H, L, D/H).
    attention_mask : torch.Tensor or None
        Additive float mask broadcastable to (B, H, L, L) (0 keep, large negative drop), as
        built by ``create_bidirectional_mask`` for ``eager``.
    scaling : float
        Factor on the scores, ``(D/H) ** -0.5``.
    dropout : float
        Dropout on the probabilities.

    Returns
    -------
    output : torch.Tensor
        (B, L, H, D/H), the layout the registry's kernels return.
    weights : torch.Tensor
        (B, H, L, L) attention probabilities.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def key_padding_mask(
    config: CellBertConfig, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """The padding mask, built once per forward in the layout the attention backend needs.

    ``None`` when nothing is padded (every kernel then runs unmasked); the 2-D mask for
    flash attention (it unpads); otherwise a (B, 1, 1, L) mask over keys that broadcasts
    over heads and queries: boolean for ``sdpa``, additive float for ``eager``.
    transformers' ``create_bidirectional_mask`` (used for any other backend) materialises
    (B, 1, L, L) instead, which at batch 24 and L 2048 is 100 M entries that CPU SDPA also
    converts to float: one such forward peaked at 828 MiB with it and 587 MiB with this.

    Parameters
    ----------
    config : CellBertConfig
        Names the attention backend (``config._attn_implementation``).
    hidden_states : torch.Tensor
        (B, L, D) embeddings (dtype and device of the float mask).
    attention_mask : torch.Tensor or None
        (B, L), 1 for real tokens and 0 for padding.
    """
    implementation = config._attn_implementation or "eager"
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if "flash" in implementation:
        return attention_mask
    if implementation not in ("eager", "sdpa"):
        return create_bidirectional_mask(
            config=config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
    keep = attention_mask[:, None, None, :].to(torch.bool)
    if implementation == "sdpa":
        return keep
    dtype = hidden_states.dtype
    blocked = torch.zeros(keep.shape, dtype=dtype, device=hidden_states.device)
    return blocked.masked_fill(~keep, torch.finfo(dtype).min)


class CellBertSelfAttention(nn.Module):
    """Multi-head bidirectional self-attention with separate ``query``/``key``/``value``.

    Separate ``nn.Linear`` projections (not ``nn.MultiheadAttention``, whose fused
    ``in_proj_weight`` and functional ``out_proj`` call receive no LoRA gradient) keep every
    projection a LoRA target. ``is_causal = False`` because SDPA and flash kernels otherwise
    default to a causal mask.
    """

    is_causal = False

    def __init__(self, config: CellBertConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend (B, L, D) -> (B, L, D) under the mask prepared once by the model."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.out_proj(output.reshape(batch, length, -1))


class CellBertLayer(GradientCheckpointingLayer):
    """Pre-LN block: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``.

    Subclassing ``GradientCheckpointingLayer`` lets
    ``model.activation_checkpointing_enable()`` recompute this block in backward instead of
    storing its activations.
    """

    def __init__(self, config: CellBertConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = CellBertSelfAttention(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Transform (B, L, D) -> (B, L, D)."""
        attended = self.attention(self.attention_norm(hidden_states), attention_mask)
        hidden_states = hidden_states + self.dropout(attended)
        transformed = self.ffn_out(self.activation(self.ffn_in(self.ffn_norm(hidden_states))))
        return hidden_states + self.dropout(transformed)


class CellBertPreTrainedModel(ModelCardMixin, PreTrainedModel):
    """Shared loading, initialisation and attention-backend declarations."""

    config_class = CellBertConfig
    config: CellBertConfig
    base_model_prefix = "cellbert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CellBertLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class CellBertModel(CellEncoderMixin, CellBertPreTrainedModel):
    """CellBert encoder returning one vector per token.

    Parameters
    ----------
    config : CellBertConfig
        Architecture.

    Examples
    --------
    >>> config = CellBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
    ...                         num_attention_heads=2, intermediate_size=64)
    >>> model = CellBertModel(config)
    >>> out = model(input_ids=torch.tensor([[2, 10, 11, 0]]),
    ...             attention_mask=torch.tensor([[1, 1, 1, 0]]))
    >>> out.last_hidden_state.shape
    torch.Size([1, 4, 32])
    """

    # Loading a masked-gene checkpoint as the bare encoder leaves its head unused, by design.
    _keys_to_ignore_on_load_unexpected = [r"^head\."]

    def __init__(self, config: CellBertConfig) -> None:
        super().__init__(config)
        self.embeddings = CellEmbeddings(config)
        self.layers = nn.ModuleList(
            [CellBertLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
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
        """Encode a padded batch of cells.

        Parameters
        ----------
        input_ids : torch.Tensor
            (B, L) long, ``<cls>`` then ranked gene tokens, padded with ``pad_token_id``.
        attention_mask : torch.Tensor or None
            (B, L), 1 for real tokens, 0 for padding; ``None`` means no padding.
        context_ids : torch.Tensor or None
            (B, C) long context tokens (species, assay, modality); pad id = absent.
        output_hidden_states : bool or None
            Also return the embedding output and every block's output.

        Returns
        -------
        BaseModelOutput
            ``last_hidden_state`` (B, L, D) after the final LayerNorm; ``hidden_states`` a
            tuple of L+1 tensors when requested.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = self.embeddings(input_ids, context_ids)
        mask = key_padding_mask(self.config, hidden_states, attention_mask)
        return run_layers(self.layers, hidden_states, mask, self.final_norm, output_hidden_states)


class CellBertForMaskedGeneModeling(MaskedGeneModelingMixin, CellBertPreTrainedModel):
    """CellBert with the masked-gene head, the pretraining objective and checkpoint.

    The head's decoder is tied to the input embedding; logits are computed only where
    ``labels != -100``.

    Parameters
    ----------
    config : CellBertConfig
        Architecture.
    """

    _tied_weights_keys = {"head.decoder.weight": "cellbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: CellBertConfig) -> None:
        super().__init__(config)
        self.cellbert = CellBertModel(config)
        self.head = MaskedGeneHead(config)
        self.post_init()
