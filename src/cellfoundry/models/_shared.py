"""Pieces both backbones must share: config fields, embeddings, masked-gene head, pooling.

Both :mod:`~cellfoundry.models.cellbert` and :mod:`~cellfoundry.models.cellmamba` read the
same tokens (see ``cellfoundry.tokenization``), so the way tokens become vectors and vectors
become gene predictions is written once here. Everything that differs between attention and
state-space mixing lives in the backbone packages.

Tensor shape glossary: B batch, L tokens, C context tokens, D hidden, V vocabulary,
M masked positions.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that marks a position as not predicted (PyTorch's cross-entropy default)."""

PoolingStrategy = Literal["cls", "mean", "max"]


@strict
class CellEncoderConfig(PreTrainedConfig):
    """Architecture fields every cellfoundry encoder shares.

    Not registered as a model type itself: :class:`CellBertConfig` and
    :class:`CellMambaConfig` subclass it so that embeddings, the masked-gene head and the
    tokenizer check read the same field names whatever the backbone.

    Parameters
    ----------
    vocab_size : int
        Number of token ids (special + context + gene tokens); set it from
        ``len(tokenizer.vocab)``, e.g. with :meth:`from_tokenizer`.
    hidden_size : int
        Width D of every token vector.
    num_hidden_layers : int
        Number of mixing blocks (attention or SSD).
    max_position_embeddings : int
        Longest input the learned position table covers (tokenizer ``max_length`` + 0;
        the ``<cls>`` token is part of ``input_ids``). Raise it (e.g. 4096) for long cells.
    hidden_dropout_prob : float
        Dropout on embeddings and residual branches.
    layer_norm_eps : float
        Epsilon of every LayerNorm.
    initializer_range : float
        Standard deviation of the normal initialisation of linear and embedding weights.
    pad_token_id, mask_token_id, cls_token_id : int
        Special ids of the tokenizer (``<pad>``=0, ``<mask>``=1, ``<cls>``=2 by default).
    tokenizer_id : str or None
        Name of the tokenizer artifact the model was trained with (``tokenizer.name``).
        ``None`` only for throw-away test models.
    vocab_sha256 : str or None
        ``tokenizer.vocab.sha256`` at training time; a different vocabulary maps ids to other
        genes, which :func:`check_tokenizer_compatible` refuses.
    tie_word_embeddings : bool
        Tie the masked-gene decoder to the input embedding (fewer parameters, and the
        output space is the same gene space as the input).
    """

    vocab_size: int = 30_000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    max_position_embeddings: int = 2048
    hidden_dropout_prob: float | int = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    mask_token_id: int = 1
    cls_token_id: int = 2
    tokenizer_id: str | None = None
    vocab_sha256: str | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("pad_token_id", "mask_token_id", "cls_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name}={value} is outside the vocabulary (size {self.vocab_size}); "
                    "build the config with from_tokenizer(tokenizer) so the ids match."
                )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> CellEncoderConfig:
        """Build a config whose vocabulary fields come from ``tokenizer``.

        Parameters
        ----------
        tokenizer
            Any object with ``name`` and ``vocab`` (``len(vocab)``, ``vocab.sha256``,
            ``vocab.pad_id``, ``vocab.mask_id``, ``vocab.cls_id``), such as the result of
            ``cellfoundry.tokenization.load_tokenizer``.
        **kwargs
            Other config fields (sizes, dropout, ...).

        Returns
        -------
        CellEncoderConfig
            An instance of the class this is called on, recording the tokenizer's id and hash.
        """
        vocab = tokenizer.vocab
        fields = {
            "vocab_size": len(vocab),
            "pad_token_id": int(vocab.pad_id),
            "mask_token_id": int(vocab.mask_id),
            "cls_token_id": int(vocab.cls_id),
            "tokenizer_id": str(tokenizer.name),
            "vocab_sha256": str(vocab.sha256),
        }
        fields.update(kwargs)
        return cls(**fields)


def check_tokenizer_compatible(config_or_model: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids mean other genes than those the model was trained on.

    Token ids are positions in one vocabulary; a model fed ids from another vocabulary runs
    without error and silently reads the wrong genes. This check turns that into an error.
    Fields the config leaves ``None`` (test models) are not compared.

    Parameters
    ----------
    config_or_model
        A :class:`CellEncoderConfig` or a model (or PEFT wrapper) with ``.config``.
    tokenizer
        Object with ``name`` and ``vocab`` (``len``, ``sha256``, ``pad_id``, ``mask_id``,
        ``cls_id``).

    Raises
    ------
    ValueError
        When the tokenizer id, vocabulary hash, size or special ids differ; the message
        names both values and how to fix it.
    """
    config = getattr(config_or_model, "config", config_or_model)
    vocab = tokenizer.vocab
    fix = (
        f"load the tokenizer the model was trained with "
        f"(load_tokenizer({config.tokenizer_id!r})) and re-tokenize the data"
    )
    problems = []
    if config.tokenizer_id is not None and config.tokenizer_id != tokenizer.name:
        problems.append(f"model tokenizer_id={config.tokenizer_id!r}, tokenizer={tokenizer.name!r}")
    if config.vocab_sha256 is not None and config.vocab_sha256 != vocab.sha256:
        problems.append(f"model vocab_sha256={config.vocab_sha256}, tokenizer vocab={vocab.sha256}")
    if len(vocab) > config.vocab_size:
        problems.append(f"tokenizer has {len(vocab)} tokens, model vocab_size={config.vocab_size}")
    specials = (
        ("pad_token_id", "pad_id"),
        ("mask_token_id", "mask_id"),
        ("cls_token_id", "cls_id"),
    )
    for config_name, vocab_name in specials:
        model_id, tok_id = getattr(config, config_name), getattr(vocab, vocab_name)
        if model_id is not None and model_id != tok_id:
            problems.append(f"model {config_name}={model_id}, tokenizer {vocab_name}={tok_id}")
    if problems:
        raise ValueError(
            "Tokenizer does not match the model: " + "; ".join(problems) + f". Fix: {fix}."
        )
    if config.tokenizer_id is None or config.vocab_sha256 is None:
        logger.debug(
            "Model config records no tokenizer id/hash; only sizes and special ids checked."
        )


class CellEmbeddings(nn.Module):
    """Token + learned position + context embeddings, then LayerNorm and dropout.

    Context tokens (species, assay, modality) are looked up in the same table as genes and
    their sum is added to every position, like BERT's token-type embedding: the cell's
    context conditions every gene without occupying sequence positions, so positions and
    labels of the gene tokens are the same with or without context. Context ids equal to
    ``pad_token_id`` are ignored, so batches may mix cells with and without a context field.

    Parameters
    ----------
    config : CellEncoderConfig
        Supplies ``vocab_size``, ``hidden_size``, ``max_position_embeddings``,
        ``pad_token_id``, ``layer_norm_eps`` and ``hidden_dropout_prob``.
    """

    def __init__(self, config: CellEncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pad_token_id = config.pad_token_id
        self.max_positions = config.max_position_embeddings

    def forward(
        self, input_ids: torch.Tensor, context_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed ``input_ids`` (B, L) and optional ``context_ids`` (B, C) into (B, L, D)."""
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(
                f"Input has {length} tokens but max_position_embeddings={self.max_positions}; "
                "tokenize with a smaller max_length or build the model with a larger "
                "max_position_embeddings."
            )
        positions = torch.arange(length, device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if context_ids is not None:
            context = self.word_embeddings(context_ids)
            if self.pad_token_id is not None:
                context = context * (context_ids != self.pad_token_id).unsqueeze(-1)
            embeddings = embeddings + context.sum(dim=1, keepdim=True)
        return self.dropout(self.layer_norm(embeddings))


class MaskedGeneHead(nn.Module):
    """Predict the gene at a position: dense -> activation -> LayerNorm -> decoder.

    ``decoder.weight`` is tied to the input word embedding by the owning model (declared in
    its ``_tied_weights_keys``); ``decoder.bias`` stays free.

    Parameters
    ----------
    config : CellEncoderConfig
        Supplies ``hidden_size``, ``vocab_size``, ``layer_norm_eps`` and ``hidden_act``.
    """

    def __init__(self, config: CellEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[getattr(config, "hidden_act", "gelu")]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Map (..., D) hidden states to (..., V) logits."""
        return self.decoder(self.layer_norm(self.activation(self.dense(hidden_states))))


def masked_gene_logits_and_loss(
    head: MaskedGeneHead, hidden_states: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and cross-entropy for masked-gene modelling.

    With labels, the head runs only at positions whose label is not -100: about 15 % of
    tokens are masked, so this saves most of the (L, V) decoder work and memory.

    Parameters
    ----------
    head : MaskedGeneHead
        The decoder.
    hidden_states : torch.Tensor
        (B, L, D) final hidden states.
    labels : torch.Tensor or None
        (B, L) long; -100 where no prediction is scored.

    Returns
    -------
    logits : torch.Tensor
        (M, V) at the labelled positions in row-major order when ``labels`` is given,
        otherwise (B, L, V) for every position.
    loss : torch.Tensor or None
        Mean cross-entropy over labelled positions; 0 (still in the graph) when none is
        labelled; ``None`` without labels.
    """
    if labels is None:
        return head(hidden_states), None
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids shape "
            f"{tuple(hidden_states.shape[:2])}; the collator must give one label per token."
        )
    selected = labels != IGNORE_INDEX
    logits = head(hidden_states[selected])
    if logits.shape[0] == 0:
        return logits, logits.sum() * 0.0
    loss = nn.functional.cross_entropy(logits.float(), labels[selected])
    return logits, loss


def run_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    layer_input: Any,
    final_norm: nn.Module,
    output_hidden_states: bool,
) -> BaseModelOutput:
    """Run encoder blocks in order (each ``layer(hidden, layer_input)``), then the final norm.

    ``layer_input`` is what every block needs besides the hidden states: the attention mask
    for CellBert, the padding-aware flip index for CellMamba.
    """
    all_hidden = (hidden_states,) if output_hidden_states else None
    for layer in layers:
        hidden_states = layer(hidden_states, layer_input)
        if all_hidden is not None:
            all_hidden = all_hidden + (hidden_states,)
    return BaseModelOutput(last_hidden_state=final_norm(hidden_states), hidden_states=all_hidden)


class ModelCardMixin:
    """``save_pretrained`` also writes the model card; ``from_pretrained`` reloads its facts.

    The card (``README.md``) is rendered from the config and ``self.card_info``
    (:class:`cellfoundry.hub.ModelCardInfo`), which is saved beside it as ``card.json``.
    """

    card_info = None

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Save weights and config (transformers), then the model card."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from cellfoundry.hub import write_model_card

            write_model_card(self, save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """Load as transformers does; keep the card facts of a local folder."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from pathlib import Path

        from cellfoundry.hub import ModelCardInfo

        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir():
            model.card_info = ModelCardInfo.load(folder)
            model.card_name = folder.name
        return model


class CellEncoderMixin:
    """Embedding-table accessors shared by the bare encoders (``self.embeddings``)."""

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table (shared by gene and context tokens)."""
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding table (used by ``resize_token_embeddings``)."""
        self.embeddings.word_embeddings = value


class MaskedGeneModelingMixin:
    """Head plumbing and forward shared by every ``*ForMaskedGeneModeling`` class.

    Subclasses set ``self.<base_model_prefix>`` (the encoder) and ``self.head``
    (:class:`MaskedGeneHead`); HF's ``base_model`` property finds the encoder by prefix.
    """

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table of the encoder."""
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        """The head's decoder, tied to the input embedding."""
        return self.head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the decoder (used by ``resize_token_embeddings``)."""
        self.head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> MaskedLMOutput:
        """Predict masked genes.

        Parameters
        ----------
        input_ids, attention_mask, context_ids, output_hidden_states
            As in the encoder's ``forward``.
        labels : torch.Tensor or None
            (B, L) long, the original gene id at masked positions and -100 elsewhere.

        Returns
        -------
        MaskedLMOutput
            ``loss`` (mean cross-entropy) and ``logits``: (M, V) at labelled positions in
            row-major order when ``labels`` is given, else (B, L, V).
        """
        outputs = self.base_model(
            input_ids,
            attention_mask=attention_mask,
            context_ids=context_ids,
            output_hidden_states=output_hidden_states,
        )
        logits, loss = masked_gene_logits_and_loss(self.head, outputs.last_hidden_state, labels)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def pool_hidden_states(
    last_hidden_state: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    strategy: PoolingStrategy = "cls",
) -> torch.Tensor:
    """One vector per cell from token vectors.

    Pooling is a choice made when embedding, not part of a checkpoint, so it lives outside
    the model classes and works with any backbone.

    Parameters
    ----------
    last_hidden_state : torch.Tensor
        (B, L, D) model output.
    attention_mask : torch.Tensor or None
        (B, L), 1 for real tokens; ``None`` means all tokens are real.
    strategy : {"cls", "mean", "max"}
        ``cls``: the vector at position 0 (the ``<cls>`` token). ``mean``/``max``: over the
        gene tokens (real positions after ``<cls>``); a cell with no gene token falls back
        to its ``<cls>`` vector.

    Returns
    -------
    torch.Tensor
        (B, D).
    """
    if strategy == "cls":
        return last_hidden_state[:, 0]
    if strategy not in ("mean", "max"):
        raise ValueError(f"Unknown pooling strategy {strategy!r}; use 'cls', 'mean' or 'max'.")
    batch, length, _ = last_hidden_state.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, device=last_hidden_state.device)
    genes = attention_mask.to(torch.bool).clone()
    genes[:, 0] = False
    has_genes = genes.any(dim=1, keepdim=True)
    weights = genes.unsqueeze(-1)
    if strategy == "mean":
        pooled = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
    else:
        fill = torch.finfo(last_hidden_state.dtype).min
        pooled = last_hidden_state.masked_fill(~weights, fill).amax(dim=1)
    return torch.where(has_genes, pooled, last_hidden_state[:, 0])
