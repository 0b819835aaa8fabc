"""SSD scans: the chunked PyTorch scan equals the sequential recurrence, stably."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cellfoundry.models import CellMambaConfig, CellMambaForMaskedGeneModeling
from cellfoundry.models.cellmamba.ssd import (
    causal_decay,
    ssd_chunked,
    ssd_scan,
    ssd_sequential,
)

HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


def scan_inputs(
    length: int = 40,
    heads: int = 4,
    groups: int = 2,
    max_decay: float = 8.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """x, dt, A, B, C with |A * dt| spread up to ``max_decay`` (realistic trained decays)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, heads, 8, generator=generator, dtype=dtype)
    dt = torch.rand(2, length, heads, generator=generator, dtype=dtype) * 0.999 + 0.001
    A = -torch.linspace(0.05, max_decay, heads, dtype=dtype)
    B = torch.randn(2, length, groups, 16, generator=generator, dtype=dtype)
    C = torch.randn(2, length, groups, 16, generator=generator, dtype=dtype)
    return tuple(t.requires_grad_() for t in (x, dt, A, B, C))


def outputs_and_grads(scan, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    y = scan(*inputs)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return [y, *torch.autograd.grad((y * weights).sum(), inputs)]


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_chunked_scan_matches_sequential_outputs_and_gradients(chunk_size: int) -> None:
    inputs = scan_inputs()  # L=40: not a multiple of 16 or 64, exercises end padding
    assert (inputs[1] * inputs[2]).abs().max() > 7.5
    chunked = outputs_and_grads(lambda *a: ssd_chunked(*a, chunk_size=chunk_size), inputs)
    reference = outputs_and_grads(ssd_sequential, inputs)
    for name, got, expected in zip(
        ["y", "dx", "ddt", "dA", "dB", "dC"], chunked, reference, strict=True
    ):
        assert torch.isfinite(got).all(), name
        scale = expected.abs().max()
        torch.testing.assert_close(got / scale, expected / scale, atol=2e-6, rtol=0, msg=name)


def test_chunked_scan_is_exact_in_float64() -> None:
    inputs = scan_inputs(dtype=torch.float64)
    chunked = outputs_and_grads(lambda *a: ssd_chunked(*a, chunk_size=16), inputs)
    reference = outputs_and_grads(ssd_sequential, inputs)
    for got, expected in zip(chunked, reference, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_chunked_scan_stays_finite_under_extreme_decays() -> None:
    # |A * dt| up to ~200: long prefix sums reach -8000; exp of their differences would
    # overflow, the segment-sum formulation must not.
    inputs = scan_inputs(length=128, max_decay=200.0)
    got = outputs_and_grads(lambda *a: ssd_chunked(*a, chunk_size=64), inputs)
    expected = outputs_and_grads(ssd_sequential, inputs)
    for a, b in zip(got, expected, strict=True):
        assert torch.isfinite(a).all()
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, atol=2e-6, rtol=0)


def test_causal_decay_is_exact_and_masked() -> None:
    values = -torch.rand(2, 6, dtype=torch.float64) * 8
    decay = causal_decay(values)
    for i in range(6):
        for j in range(6):
            expected = values[:, j + 1 : i + 1].sum(-1).exp() if i >= j else torch.zeros(2)
            torch.testing.assert_close(decay[:, i, j], expected.to(decay.dtype))
    huge = torch.full((1, 64), -50.0, requires_grad=True)  # sums down to -3150
    decay = causal_decay(huge)
    decay.sum().backward()
    assert torch.isfinite(decay).all() and torch.isfinite(huge.grad).all()


def test_grouped_projections_equal_explicit_per_head_copies() -> None:
    x, dt, A, B, C = (t.detach() for t in scan_inputs(heads=4, groups=2))
    per_head = [t.repeat_interleave(2, dim=2) for t in (B, C)]
    torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, 8), ssd_chunked(x, dt, A, *per_head, 8))


def test_scan_dispatch_and_errors() -> None:
    x, dt, A, B, C = (t.detach() for t in scan_inputs(length=12))
    assert torch.equal(ssd_scan(x, dt, A, B, C, 8, "torch"), ssd_chunked(x, dt, A, B, C, 8))
    assert torch.equal(ssd_scan(x, dt, A, B, C, 8, "sequential"), ssd_sequential(x, dt, A, B, C))
    assert torch.equal(ssd_scan(x, dt, A, B, C, 8, "auto"), ssd_chunked(x, dt, A, B, C, 8))
    with pytest.raises(ValueError, match="Unknown SSD implementation"):
        ssd_scan(x, dt, A, B, C, 8, "cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(x, dt[:, :, :2], A, B, C, 8)
    with pytest.raises(ImportError, match="mamba_ssm"):  # CPU tensors: never the kernel
        ssd_scan(x, dt, A, B, C, 8, "mamba_ssm")
    with pytest.raises(ValueError, match="ssd_implementation"):
        CellMambaConfig(hidden_size=32, head_dim=16, ssd_implementation="triton")


def test_model_with_chunked_scan_matches_sequential_scan() -> None:
    def model(implementation: str) -> CellMambaForMaskedGeneModeling:
        torch.manual_seed(0)
        config = CellMambaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            head_dim=16,
            state_size=8,
            chunk_size=4,
            hidden_dropout_prob=0.0,
            ssd_implementation=implementation,
        )
        return CellMambaForMaskedGeneModeling(config).eval()

    input_ids = torch.randint(8, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        chunked = model("torch")(input_ids, mask).logits
        sequential = model("sequential")(input_ids, mask).logits
    torch.testing.assert_close(chunked, sequential, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="needs mamba_ssm")
def test_mamba_ssm_kernel_matches_chunked_scan_on_gpu() -> None:
    inputs = [t.detach().cuda() for t in scan_inputs(length=256, heads=8, groups=2)]
    kernel = ssd_scan(*inputs, chunk_size=64, implementation="mamba_ssm")
    reference = ssd_chunked(*inputs, chunk_size=64)
    torch.testing.assert_close(kernel, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("length", [1, 2, 3, 9])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_depthwise_conv_equals_conv1d_in_values_and_gradients(
    length: int, with_bias: bool
) -> None:
    """The hand-written conv and its backward against nn.Conv1d (truncated to L outputs), float64,
    including cells shorter than the kernel."""
    from cellfoundry.models.cellmamba.modeling_cellmamba import causal_depthwise_conv

    torch.manual_seed(0)
    channels, kernel = 5, 4
    conv = torch.nn.Conv1d(
        channels, channels, kernel, groups=channels, padding=kernel - 1, bias=with_bias
    ).double()
    x = torch.randn(2, length, channels, dtype=torch.float64, requires_grad=True)
    reference = conv(x.transpose(1, 2))[..., :length].transpose(1, 2)
    ours = causal_depthwise_conv(x, conv.weight, conv.bias)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    upstream = torch.randn_like(reference)
    inputs = [x, conv.weight] + ([conv.bias] if with_bias else [])
    wanted = torch.autograd.grad(reference, inputs, upstream)
    got = torch.autograd.grad(ours, inputs, upstream)
    for g, w in zip(got, wanted, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t, w: causal_depthwise_conv(t, w, None), (x, conv.weight.detach().requires_grad_())
    )
