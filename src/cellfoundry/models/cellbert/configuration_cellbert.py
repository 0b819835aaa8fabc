"""Architecture config of CellBert, the attention encoder over ranked gene tokens."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict

from .._shared import CellEncoderConfig


@strict
class CellBertConfig(CellEncoderConfig):
    """Sizes of a bidirectional pre-LayerNorm Transformer encoder (BERT-like).

    Inherits the vocabulary, position, dropout and tokenizer fields of
    :class:`~cellfoundry.models._shared.CellEncoderConfig`.

    Parameters
    ----------
    num_attention_heads : int
        Heads H; ``hidden_size`` must be a multiple of it.
    intermediate_size : int
        Width of the feed-forward layer (``ffn_in`` output).
    hidden_act : str
        Activation of the feed-forward layer and the masked-gene head (a key of
        ``transformers.activations.ACT2FN``).
    attention_probs_dropout_prob : float
        Dropout on attention probabilities (training only).

    Notes
    -----
    The attention backend is not a config field: choose it with
    ``from_pretrained(..., attn_implementation="eager" | "sdpa" | "flash_attention_2")`` or
    ``model.set_attn_implementation(...)``; the default is ``sdpa``.
    """

    model_type = "cellfoundry-bert"

    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    attention_probs_dropout_prob: float | int = 0.1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a positive multiple of "
                f"num_attention_heads ({self.num_attention_heads}); change one of them."
            )
