"""Rank-value gene tokenization (numpy/scipy only: importing this never imports torch)."""

from cellfoundry.tokenization.context import ContextSpec
from cellfoundry.tokenization.pipeline import (
    TokenizeOptions,
    TokenizeReport,
    iter_tokenized,
    load_tokenized,
    tokenize_files,
    tokenize_to_table,
)
from cellfoundry.tokenization.rank_value import RankedChunk, RankValueTokenizer
from cellfoundry.tokenization.registry import (
    DEFAULT_TOKENIZER,
    load_tokenizer,
    shipped_tokenizers,
)
from cellfoundry.tokenization.vocab import GeneVocab

__all__ = [
    "DEFAULT_TOKENIZER",
    "ContextSpec",
    "GeneVocab",
    "RankValueTokenizer",
    "RankedChunk",
    "TokenizeOptions",
    "TokenizeReport",
    "iter_tokenized",
    "load_tokenized",
    "load_tokenizer",
    "shipped_tokenizers",
    "tokenize_files",
    "tokenize_to_table",
]
