"""AdamW with the usual decay exemptions, and warm-up + decay learning-rate schedules.

Weight decay shrinks weights towards zero, which regularises matrices but only distorts
parameters that set a scale or an offset: biases, LayerNorm/RMSNorm gains (including the
embedding LayerNorm) and the Mamba per-head scalars (``A_log``, ``D``, ``dt_bias``). All of
these are the 0-D/1-D parameters, so the rule is "decay only parameters with two or more
dimensions" (plus any parameter flagged ``_no_weight_decay``), which holds for every
backbone without listing module names.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import get_scheduler

logger = logging.getLogger(__name__)

_SCHEDULER_NAMES = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant_with_warmup",
}


def decays(parameter: nn.Parameter) -> bool:
    """Whether ``parameter`` gets weight decay (matrices and embeddings only)."""
    return parameter.ndim >= 2 and not getattr(parameter, "_no_weight_decay", False)


def parameter_groups(
    model: nn.Module, weight_decay: float, learning_rates: Mapping[str, float] | None = None
) -> list[dict]:
    """Split the trainable parameters into decayed and non-decayed AdamW groups.

    Parameters
    ----------
    model : nn.Module
        The model (tied weights appear once, as ``named_parameters`` deduplicates them).
    weight_decay : float
        Decay of the decayed groups.
    learning_rates : mapping or None
        ``{name prefix: learning rate}`` for parameters whose own learning rate differs
        from the optimizer's (e.g. ``{"head.": 5e-3}``: a fresh task head learns at a rate
        that would wreck pretrained weights); the first matching prefix wins.

    Returns
    -------
    list of dict
        AdamW groups: for the default rate and each prefix, one decayed group and one
        with ``weight_decay`` 0 (``lr`` set on prefixed groups); empty groups left out.
    """
    prefixes = dict(learning_rates or {})
    buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            buckets.setdefault((prefix, decays(parameter)), []).append(parameter)
    if not buckets:
        raise ValueError("The model has no trainable parameters; nothing to optimise.")
    groups = []
    for prefix in (None, *prefixes):
        for decayed in (True, False):
            params = buckets.get((prefix, decayed))
            if params:
                group = {
                    "params": params,
                    "weight_decay": weight_decay if decayed else 0.0,
                    "prefix": prefix or "",  # which parameters: "" = those at the default rate
                }
                if prefix is not None:
                    group["lr"] = prefixes[prefix]
                groups.append(group)
    return groups


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    learning_rates: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (decoupled decay, no decay on biases and norms)."""
    groups = parameter_groups(model, weight_decay, learning_rates)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float = 0.0,
    held_groups: Sequence[int] = (),
    held_steps: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine, linear or no decay (transformers' ``get_scheduler``).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer whose learning rates are scheduled (peak = the group's ``lr``).
    schedule : {"cosine", "linear", "constant"}
        Shape after warm-up.
    num_warmup_steps, num_training_steps : int
        In optimizer steps (after gradient accumulation), not batches.
    min_lr_ratio : float
        Cosine only: decay to this share of the peak instead of 0.
    held_groups, held_steps : sequence of int, int
        Optimizer groups whose learning rate stays 0 for the first ``held_steps`` steps and
        then follows the schedule from its start (warm-up included): the encoder in
        "linear probe, then fine-tune" (Kumar et al. 2022), while the head trains throughout.

    Returns
    -------
    torch.optim.lr_scheduler.LRScheduler
        Step it once per optimizer step.
    """
    if schedule not in _SCHEDULER_NAMES:
        choices = sorted(_SCHEDULER_NAMES)
        raise ValueError(f"Unknown lr schedule {schedule!r}; use one of {choices}.")
    if num_warmup_steps > num_training_steps:
        raise ValueError(
            f"Warm-up ({num_warmup_steps} steps) is longer than training ({num_training_steps}); "
            "lower warmup_steps/warmup_ratio or raise max_steps."
        )
    name, extra = _SCHEDULER_NAMES[schedule], {}
    if schedule == "cosine" and min_lr_ratio > 0:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": min_lr_ratio}
    elif min_lr_ratio > 0:
        logger.warning("min_lr_ratio only applies to cosine; ignored for %s.", schedule)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=extra or None,
    )
    if held_steps > 0 and held_groups:
        if held_steps >= num_training_steps:
            raise ValueError(
                f"The encoder is held for {held_steps} of {num_training_steps} steps and would "
                "never train; lower head_only_steps or raise max_steps."
            )
        remaining = num_training_steps - held_steps
        # The delayed schedule's shape comes from transformers on a throwaway optimizer (it
        # sets the learning rates of the optimizer it is given).
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        late = get_scheduler(
            name,
            dummy,
            num_warmup_steps=min(num_warmup_steps, remaining),
            num_training_steps=remaining,
            scheduler_specific_kwargs=extra or None,
        ).lr_lambdas[0]
        for index in held_groups:
            scheduler.lr_lambdas[index] = functools.partial(_after, late, held_steps)
            optimizer.param_groups[index]["lr"] = 0.0
    return scheduler


def _after(schedule: Callable[[int], float], delay: int, step: int) -> float:
    """``schedule`` started ``delay`` steps late: 0 until then."""
    return 0.0 if step < delay else schedule(step - delay)
