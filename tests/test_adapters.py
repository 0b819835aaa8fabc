"""LoRA through peft: the right parameters train, get gradients, and save/load/merge."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

from cellfoundry.adapters import DEFAULT_LORA_TARGETS, add_lora, find_model_type, merge_lora
from cellfoundry.models import (
    CellBertConfig,
    CellBertForMaskedGeneModeling,
    CellBertModel,
    CellMambaConfig,
    CellMambaForMaskedGeneModeling,
)

BACKBONES = ["bert", "mamba"]


def tiny_mgm_model(backbone: str) -> nn.Module:
    """Unit-test sized masked-gene model (hidden 32, 2 layers, vocab 64), dropout off."""
    torch.manual_seed(0)
    common = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "hidden_dropout_prob": 0.0,
    }
    if backbone == "bert":
        config = CellBertConfig(
            **common, num_attention_heads=4, intermediate_size=64, attention_probs_dropout_prob=0.0
        )
        return CellBertForMaskedGeneModeling(config).eval()
    config = CellMambaConfig(**common, head_dim=16, state_size=8, chunk_size=8)
    return CellMambaForMaskedGeneModeling(config).eval()


def mgm_batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(8, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    input_ids[:, 0] = 2
    labels = torch.full_like(input_ids, -100)
    labels[:, 3:7] = input_ids[:, 3:7]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def lora_parameters(model: nn.Module, kind: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f"{kind}." in n}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_only_lora_and_head_parameters_train(backbone: str) -> None:
    base = tiny_mgm_model(backbone)
    targets = DEFAULT_LORA_TARGETS[base.config.model_type]
    wrapped = sum(name.rsplit(".", 1)[-1] in targets for name, _ in base.named_modules())
    model = add_lora(base, r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_" in name or ".head.modules_to_save." in name, name
    assert len(lora_parameters(model, "lora_B")) == wrapped  # every target got an adapter
    assert isinstance(model, PeftModel)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_adapter_receives_gradient(backbone: str) -> None:
    model = add_lora(tiny_mgm_model(backbone), r=4).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**mgm_batch()).loss.backward()
    for name, param in lora_parameters(model, "lora_B").items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()  # lora_B starts at zero, so lora_A's gradient appears after one step
    optimizer.zero_grad()
    model(**mgm_batch()).loss.backward()
    for name, param in lora_parameters(model, "lora_A").items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adapter_save_load_and_merge_reproduce_logits(backbone: str, tmp_path) -> None:
    base = tiny_mgm_model(backbone)
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, r=4).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # move the adapters and head away from their initial values
        model(**mgm_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    inputs = {k: v for k, v in mgm_batch().items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh_base = type(base).from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
        merged = merge_lora(reloaded)
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora_" in name for name, _ in merged.named_parameters())


class TinyTaskModel(nn.Module):
    """Shape of a cellfoundry task model: a backbone plus a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        config = CellBertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4
        )
        self.backbone = CellBertModel(config)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids).last_hidden_state[:, 0])


def test_task_model_wrapping_a_backbone_gets_default_targets() -> None:
    model = add_lora(TinyTaskModel(), r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("attention.query.lora_A" in n for n in trainable)
    assert any("ffn_out.lora_B" in n for n in trainable)
    assert any("head.modules_to_save" in n for n in trainable)
    model(input_ids=torch.tensor([[2, 9, 10]])).sum().backward()


def test_unknown_model_needs_explicit_targets() -> None:
    with pytest.raises(ValueError, match="target_modules"):
        find_model_type(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="PeftModel"):
        merge_lora(nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_default_targets_are_linear_layers(backbone: str) -> None:
    model = tiny_mgm_model(backbone)
    targets = DEFAULT_LORA_TARGETS[model.config.model_type]
    found = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    assert set(targets) <= found
