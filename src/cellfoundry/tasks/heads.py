"""What every task head shares: fixed whitening of pooled cell vectors.

Pooled cell vectors of a pretrained encoder share one dominant direction and differ across
cells by little: on STARmap, cellfoundry-tiny-bert's ``<cls>`` vectors have norm ~11,
per-feature sd ~0.02, and covariance eigenvalues spread over five orders of magnitude. A head
trained by AdamW on them barely learns in a fine-tuning budget (150 steps: training loss 2.06,
held-out-slice macro-F1 0.14 with per-feature standardisation). Heads therefore whiten (ZCA)
with the mean and covariance of the *training cells'* vectors under the starting encoder,
computed once before training and then kept fixed: an affine reparametrisation the next layer
absorbs as LoRA moves the encoder (same probe: loss 1.19, macro-F1 0.40). BatchNorm was tried
first: its running statistics lag a moving encoder by more than these spreads, and validation
predictions collapsed while the training loss fell.

The ridge sets how far weak directions are amplified: ``1 / sqrt(lambda + ridge * mean
lambda)``. With 0.01 a direction of near-zero variance is scaled up ~10x more than an average
one, which suits LoRA and a probe, whose changes to the vectors are small; fully fine-tuned
encoders move every weight, and the amplified changes swamp the head (see
``whitening_ridge`` in :class:`~cellfoundry.tasks.base.TaskConfig`).
"""

from __future__ import annotations

import torch
from torch import nn


class FixedWhitening(nn.Module):
    """``(x - center) @ matrix``, with both fitted once from training vectors (buffers, saved).

    Starts as the identity; :meth:`fit` sets it. ``ridge=None`` keeps the identity (no
    whitening) but still centres, so heads can switch whitening off without changing shape.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(size))
        self.register_buffer("matrix", torch.eye(size))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor, ridge: float | None = 0.01) -> None:
        """Centre and ZCA map from (cells, D) vectors.

        ``W = U diag(1 / sqrt(lambda + ridge * mean(lambda))) U^T`` from the eigenvectors of
        the covariance (float64); the ridge keeps near-zero directions from being blown up.
        """
        data = vectors.double()
        center = data.mean(dim=0)
        self.center.copy_(center)
        if ridge is None:
            self.matrix.copy_(torch.eye(len(center), dtype=torch.float64))
            return
        covariance = torch.cov((data - center).T)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp(min=0)
        inverse_sd = (eigenvalues + ridge * eigenvalues.mean()).rsqrt()
        self.matrix.copy_(eigenvectors @ torch.diag(inverse_sd) @ eigenvectors.T)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.center) @ self.matrix
