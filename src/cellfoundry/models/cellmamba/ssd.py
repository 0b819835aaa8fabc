"""State-space duality (SSD) scans of Mamba-2: chunked (default), sequential (reference), kernel.

The recurrence, per head h with scalar decay ``A[h] < 0``::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)      # (P, N)
    y_t     = state_t @ C_t                                             # (P,)

:func:`ssd_scan` is the one op boundary the model calls. It dispatches to the ``mamba_ssm``
Triton kernel when that package imports and the tensors are on CUDA, and otherwise to
:func:`ssd_chunked`, a pure-PyTorch chunked scan that runs anywhere. :func:`ssd_sequential`
is the step-by-step reference the tests hold the others to.

Numerical stability: decays enter only as ``exp`` of segment sums of ``dt * A <= 0``, taken
in log space from float64 prefix sums and clamped to [-80, 0] before ``exp`` (see
:func:`causal_decay`); suffix decays use reversed cumulative sums, never differences. No
positive exponent, ``inf`` or ``0 * inf`` appears in the forward or backward pass.

Tensor shape glossary: B batch, L tokens, H heads, P head dim, G groups (heads per group
share B and C), N state size, K chunks, T chunk length.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Literal

import torch

logger = logging.getLogger(__name__)

SSDImplementation = Literal["auto", "torch", "mamba_ssm", "sequential"]
SSD_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "torch", "mamba_ssm", "sequential")
_EXP_FLOOR = -80.0  # exp(-80) ~ 1.8e-35: still a normal float32, and numerically zero here


@functools.cache
def load_mamba_ssm_kernel() -> Callable | None:
    """Return ``mamba_ssm``'s ``mamba_chunk_scan_combined`` or ``None`` when not importable.

    Imported on first use, not at module import, so CPU users never pay for (or break on) a
    CUDA extension they do not have.
    """
    try:
        module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as error:  # ImportError, or a broken CUDA/Triton build
        logger.debug("mamba_ssm kernel unavailable (%s); using the PyTorch SSD scan.", error)
        return None
    return module.mamba_chunk_scan_combined


def _expand_groups(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat (B, L, G, N) group tensors to (B, L, H, N): heads h*G/H share group h // (H/G)."""
    groups = tensor.shape[2]
    if num_heads % groups:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of n_groups ({groups}).")
    return tensor.repeat_interleave(num_heads // groups, dim=2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half inputs (decays and sums need it), float64 kept for reference tests."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_shapes(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> None:
    batch, length, heads, _ = x.shape
    if dt.shape != (batch, length, heads) or A.shape != (heads,):
        raise ValueError(
            f"dt must be (B, L, H)={(batch, length, heads)} and A (H,)=({heads},); "
            f"got dt {tuple(dt.shape)}, A {tuple(A.shape)}."
        )
    if B.shape != C.shape or B.shape[:2] != (batch, length):
        raise ValueError(
            f"B and C must both be (B, L, G, N) with B, L = {batch}, {length}; "
            f"got {tuple(B.shape)} and {tuple(C.shape)}."
        )


def _decay_factors(log_decay: torch.Tensor) -> torch.Tensor:
    """``exp`` of clamped segment sums, (..., T) -> (..., T, T); entries above the diagonal
    are 1 (exponent clamped to 0) and must be masked by the caller."""
    prefix = log_decay.to(torch.float64).cumsum(dim=-1)
    exponent = (prefix.unsqueeze(-1) - prefix.unsqueeze(-2)).to(log_decay.dtype)
    return torch.exp(exponent.clamp(min=_EXP_FLOOR, max=0.0))


def _lower_triangle(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def causal_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """Decay factors ``exp(sum(log_decay[..., j+1 : i+1]))`` for i >= j, 0 above the diagonal.

    The segment sums are taken in log space as differences of float64 prefix sums (exact to
    ~1e-13 for any chunk length used here; float32 differences of long prefix sums lose
    precision when decays are large). Every exponent is then clamped to [-80, 0] before
    ``exp``: entries below the diagonal are <= 0 anyway, entries above it (positive, possibly
    huge) become 0 and are masked to 0 after ``exp``, so no ``inf`` (and no ``0 * inf`` NaN
    in backward) can appear. The lower bound changes only factors below exp(-80) ~ 2e-35,
    invisible next to the diagonal's factor 1, and keeps ``exp`` off its slow subnormal path.

    Parameters
    ----------
    log_decay : torch.Tensor
        (..., T) values ``dt * A`` (<= 0).

    Returns
    -------
    torch.Tensor
        (..., T, T) in the dtype of ``log_decay``.
    """
    return _decay_factors(log_decay) * _lower_triangle(log_decay.shape[-1], log_decay.device)


def ssd_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Step-by-step SSD recurrence, the reference for tests (O(L) Python steps).

    Parameters
    ----------
    x : torch.Tensor
        (B, L, H, P) inputs.
    dt : torch.Tensor
        (B, L, H) positive step sizes (after softplus).
    A : torch.Tensor
        (H,) negative decay rates.
    B, C : torch.Tensor
        (B, L, G, N) input and output projections of the state.

    Returns
    -------
    torch.Tensor
        (B, L, H, P) in the dtype of ``x``; computed in at least float32.
    """
    _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    dtype = _compute_dtype(x)
    B = _expand_groups(B.to(dtype), heads)
    C = _expand_groups(C.to(dtype), heads)
    x32, dt32 = x.to(dtype), dt.to(dtype)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1], dtype=dtype)
    outputs = []
    for t in range(length):
        decay = torch.exp(dt32[:, t] * A.to(dtype))  # (B, H)
        update = (dt32[:, t, :, None] * x32[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(-2)
        state = decay[..., None, None] * state + update
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(outputs, dim=1).to(x.dtype)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Chunked SSD scan in pure PyTorch (Mamba-2's "minimal SSD" algorithm).

    Within a chunk of T tokens the output is a masked (T, T) matrix product (quadratic,
    parallel); across chunks a (K+1, K+1) decay matrix carries the states (linear). Cost is
    O(L * T) per head instead of O(L^2) for attention, with matmuls instead of a Python loop.

    Parameters
    ----------
    x, dt, A, B, C : torch.Tensor
        As in :func:`ssd_sequential`.
    chunk_size : int
        T; the sequence is zero-padded at the end to a multiple of it (padding comes after
        every real token, so it cannot change their outputs).

    Returns
    -------
    torch.Tensor
        (B, L, H, P) in the dtype of ``x``; computed in at least float32.
    """
    _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    if heads % groups:
        raise ValueError(f"num_heads ({heads}) must be a multiple of n_groups ({groups}).")
    pad = (-length) % chunk_size
    dtype = _compute_dtype(x)
    x, dt, B, C = (t.to(dtype) for t in (x, dt, B, C))
    if pad:  # pad the time dimension (dim 1) at the end
        x, dt, B, C = (
            torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C)
        )
    chunks = (length + pad) // chunk_size
    # Work layout: heads split into (G, h = H/G) so B and C are used per group, never copied
    # per head; time before heads so the state matmuls fold (h, P) into one dimension.
    hpg = heads // groups
    x_dt = (x * dt.unsqueeze(-1)).view(batch, chunks, chunk_size, groups, hpg, head_dim)
    x_dt = x_dt.permute(0, 1, 3, 2, 4, 5).contiguous()  # (B, K, G, T, h, P)
    B = B.view(batch, chunks, chunk_size, groups, -1).transpose(2, 3).contiguous()  # (B,K,G,T,N)
    C = C.view(batch, chunks, chunk_size, groups, -1).transpose(2, 3).contiguous()
    log_decay = (dt * A.to(dtype)).view(batch, chunks, chunk_size, groups, hpg)
    log_decay = log_decay.permute(0, 1, 3, 4, 2)  # (B, K, G, h, T)
    y = _intra_chunk(x_dt, B, C, log_decay) + _inter_chunk(x_dt, B, C, log_decay)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(batch, chunks * chunk_size, heads, head_dim)
    return (y[:, :length] if pad else y).to(x.dtype)


class _DecayedScores(torch.autograd.Function):
    """``scores[..., None, :, :] * causal decay``: (B, K, G, T, T) x (B, K, G, h, T) -> per-head
    weights (B, K, G, h, T, T), with the backward written out.

    Why by hand: left to autograd, the decay's float64 segment sums, clamp and casts make
    five (h, T, T)-sized passes in backward (float64 copies and negation, the clamp's masks and
    ``where``, two float64 reductions), a third or more of the intra-chunk
    forward and backward on CPU (measured at L = 1024, 16 heads). The gradient
    of ``exp(P_i - P_j)`` needs only the row and column sums of ``g * weights``: with
    ``P = cumsum(log_decay)``, ``dP_i = sum_j G_ij - sum_k G_ki`` and ``d log_decay`` is the
    reversed cumulative sum of ``dP``. ``scores`` must be zero above the diagonal (the caller
    masks them), which zeroes those gradients without the clamp's mask; the gradient of the
    few factors floored at exp(-80) is kept (it is below 1e-34 of the upstream gradient).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
        decay = _decay_factors(log_decay)  # (B, K, G, h, T, T), 1 above the diagonal
        weights = scores.unsqueeze(3) * decay
        ctx.save_for_backward(scores, decay)
        return weights

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        scores, decay = ctx.saved_tensors
        grad_scores = grad_log_decay = None
        through_decay = grad * decay  # d weights / d scores, per head
        if ctx.needs_input_grad[0]:
            grad_scores = through_decay.sum(dim=3)
        if ctx.needs_input_grad[1]:
            exponent_grad = through_decay.mul_(scores.unsqueeze(3))  # g * weights
            prefix_grad = exponent_grad.sum(dim=-1) - exponent_grad.sum(dim=-2)  # (..., h, T)
            grad_log_decay = prefix_grad.flip(-1).cumsum(-1).flip(-1)
        return grad_scores, grad_log_decay


def _intra_chunk(
    x_dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor
) -> torch.Tensor:
    """Outputs from tokens of the same chunk: ``((C B^T) * decay) @ (x dt)``, (B, K, G, T, h, P)."""
    # C B^T is shared by the heads of a group; masking it (small) instead of the per-head
    # decay matrix (large) applies causality with one tensor fewer kept for backward.
    scores = torch.matmul(C, B.transpose(-1, -2))  # (B, K, G, T, T)
    scores = scores * _lower_triangle(scores.shape[-1], scores.device)
    weights = _DecayedScores.apply(scores, log_decay)  # (B, K, G, h, T, T)
    return torch.matmul(weights, x_dt.transpose(3, 4)).transpose(3, 4)


def _inter_chunk(
    x_dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor
) -> torch.Tensor:
    """Outputs from earlier chunks through the states carried across chunk boundaries."""
    batch, chunks, groups, length, hpg, head_dim = x_dt.shape
    prefix = log_decay.cumsum(dim=-1)  # decay from the chunk start to t, inclusive
    # Decay from t (exclusive) to the chunk end: a reversed cumulative sum shifted by one,
    # so no difference of large prefix sums is taken.
    suffix = log_decay.flip(-1).cumsum(-1).flip(-1)
    suffix = torch.nn.functional.pad(suffix[..., 1:], (0, 1))
    # State each chunk leaves at its end, (h, P) folded: (B, K, G, h*P, N).
    weighted = x_dt * torch.exp(suffix).transpose(-1, -2).unsqueeze(-1)
    states = torch.matmul(weighted.flatten(-2).transpose(-1, -2), B)
    # State entering chunk k = sum over j < k of decay(chunks j+1 .. k-1) * state_j.
    totals = torch.nn.functional.pad(prefix[..., -1].permute(0, 2, 3, 1), (1, 0))  # (B,G,h,K+1)
    # Entering chunk k: sum over j < k of carry[k, j + 1] * state_j, so the states need no
    # shift (a padded, sliced copy of the largest tensor here): the small decay matrix is
    # sliced instead. Its last row is never read; state K-1 meets zeros above the diagonal.
    carry = causal_decay(totals)[..., :chunks, 1:]  # (B, G, h, K, K)
    states = states.view(batch, chunks, groups, hpg, -1).permute(0, 2, 3, 1, 4)
    entering = torch.matmul(carry, states)  # (B, G, h, K, P*N)
    entering = entering.view(batch, groups, hpg, chunks, head_dim, -1).permute(0, 3, 1, 5, 2, 4)
    entering = entering.reshape(batch, chunks, groups, -1, hpg * head_dim)  # (B, K, G, N, h*P)
    # Read the entering state at every t, decayed from the chunk start: (B, K, G, T, h, P).
    from_state = torch.matmul(C, entering).view(batch, chunks, groups, length, hpg, head_dim)
    return from_state * torch.exp(prefix).transpose(-1, -2).unsqueeze(-1)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    implementation: SSDImplementation = "auto",
) -> torch.Tensor:
    """The single entry point from the model into an SSD scan.

    Parameters
    ----------
    x, dt, A, B, C : torch.Tensor
        As in :func:`ssd_sequential`: (B, L, H, P), (B, L, H), (H,), (B, L, G, N) x 2.
    chunk_size : int
        Chunk length for the chunked algorithms.
    implementation : {"auto", "torch", "mamba_ssm", "sequential"}
        ``auto``: the ``mamba_ssm`` kernel for CUDA tensors when it imports, else ``torch``.
        ``torch``: :func:`ssd_chunked`. ``sequential``: :func:`ssd_sequential` (slow;
        debugging). ``mamba_ssm``: the kernel, or an ``ImportError`` saying how to install.

    Returns
    -------
    torch.Tensor
        (B, L, H, P).
    """
    if implementation not in SSD_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown SSD implementation {implementation!r}; use {SSD_IMPLEMENTATIONS}."
        )
    if implementation == "sequential":
        return ssd_sequential(x, dt, A, B, C)
    if implementation in ("auto", "mamba_ssm"):
        kernel = load_mamba_ssm_kernel() if x.is_cuda else None
        if kernel is not None:  # Triton kernels want dense inputs and a float32 A
            dense = [t.contiguous() for t in (x, dt, B, C)]
            return kernel(dense[0], dense[1], A.float().contiguous(), *dense[2:], chunk_size)
        if implementation == "mamba_ssm":
            raise ImportError(
                f"ssd_implementation='mamba_ssm' needs the mamba_ssm package and CUDA tensors "
                f"(got {x.device}); install it with `pip install 'cellfoundry[cuda]'` on a GPU "
                "machine, or use 'auto'/'torch'."
            )
    return ssd_chunked(x, dt, A, B, C, chunk_size)
