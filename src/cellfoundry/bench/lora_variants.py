"""The LoRA variants the fine-tuning benchmarks compare, as ``TaskConfig`` fields.

``finetune_annotation.py`` (accuracy) and ``finetune_memory.py`` (memory) must run the same
variants under the same names, or the summary would judge a memory figure and an accuracy
figure of two different things against one target; both read them from here.
"""

from __future__ import annotations

from typing import Any

from cellfoundry.adapters import ATTENTION_LORA_TARGETS

LORA_VARIANTS: dict[str, dict[str, Any]] = {
    # the project's default: every linear layer of the encoder (DEFAULT_LORA_TARGETS)
    "lora": {},
    # the attention projections only, the placement of the original LoRA paper
    "lora_attention": {"lora_targets": list(ATTENTION_LORA_TARGETS)},
    # the same with A frozen at its random initialisation (LoRA-FA, Zhang et al. 2023)
    "lora_fa_attention": {"lora_targets": list(ATTENTION_LORA_TARGETS), "lora_freeze_a": True},
}


def task_fields(mode: str) -> dict[str, Any]:
    """``TaskConfig`` fields of a benchmark mode: ``tuning`` plus the variant's LoRA fields."""
    if mode in LORA_VARIANTS:
        return {"tuning": "lora", **LORA_VARIANTS[mode]}
    return {"tuning": mode}


def overrides(mode: str) -> list[str]:
    """The same fields as ``task.<field>=<value>`` overrides of ``finetuning/finetune.py``."""
    values = []
    for key, value in task_fields(mode).items():
        if isinstance(value, list):
            value = f"[{','.join(value)}]"
        elif isinstance(value, bool):
            value = str(value).lower()
        values.append(f"task.{key}={value}")
    return values
