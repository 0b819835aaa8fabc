"""PeakTensorMemory counts live tensor storages the way a GPU allocator's peak would."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from cellfoundry.bench.tensor_memory import PeakTensorMemory

KB4 = 1000 * 4  # bytes of 1000 float32


def test_hand_counted_allocations_views_frees_and_in_place_ops():
    existing = torch.zeros(1000)
    with PeakTensorMemory([existing, existing[10:]]) as tracked:  # a view adds nothing
        assert tracked.current == KB4
        a = torch.ones(1000)
        b = a + 1
        view = b[10:]
        assert tracked.current == 3 * KB4
        del a
        assert tracked.current == 2 * KB4
        b.add_(1)  # in place: nothing new
        c = view * 2  # 990 floats
        big = torch.ones(3000)
        assert tracked.peak == 2 * KB4 + 990 * 4 + 3 * KB4
        del big, c
        assert tracked.current == 2 * KB4
    assert tracked.peak == 6 * KB4 - 40


def _mlp_peak(recompute: bool) -> int:
    """Peak of one forward and backward of six 64 -> 256 -> 64 blocks on 512 rows."""
    torch.manual_seed(0)
    blocks = [
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        for _ in range(6)
    ]
    weights = [p for block in blocks for p in block.parameters()]
    x = torch.randn(512, 64, requires_grad=True)
    with PeakTensorMemory([*weights, x]) as tracked:
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
        h.sum().backward()
    return tracked.peak


def test_backward_allocations_are_counted_and_checkpointing_lowers_the_peak():
    linear = torch.nn.Linear(100, 100, bias=False)
    with PeakTensorMemory(linear.parameters()) as tracked:
        linear(torch.randn(50, 100)).sum().backward()
    # the weight, and the weight's gradient made in backward, alive together at the end
    assert tracked.current >= 2 * 100 * 100 * 4
    plain, recomputed = _mlp_peak(recompute=False), _mlp_peak(recompute=True)
    # without recomputation every block keeps its two 256-wide activations until backward
    assert plain > 6 * 2 * 512 * 256 * 4
    # with it, only each block's 64-wide input stays, and one block is recomputed at a time
    assert recomputed < plain / 2
