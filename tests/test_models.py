"""CellBert and CellMamba: loading, inputs, attention backends, padding, heads, checkpointing."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

from cellfoundry.models import (
    CellBertConfig,
    CellBertForMaskedGeneModeling,
    CellBertModel,
    CellMambaConfig,
    CellMambaForMaskedGeneModeling,
    CellMambaModel,
    check_tokenizer_compatible,
    load_model,
    pool_hidden_states,
)
from cellfoundry.models.cellmamba.modeling_cellmamba import valid_length_flip_index

BACKBONES = ["bert", "mamba"]
VOCAB, LENGTH = 64, 16
CLASSES = {
    "bert": (CellBertConfig, CellBertModel, CellBertForMaskedGeneModeling),
    "mamba": (CellMambaConfig, CellMambaModel, CellMambaForMaskedGeneModeling),
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_config(backbone: str, **overrides: object) -> CellBertConfig | CellMambaConfig:
    """Unit-test sized config (hidden 32, 2 layers, vocab 64), dropout off for determinism."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
    }
    if backbone == "bert":
        specific = {
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "attention_probs_dropout_prob": 0.0,
        }
    else:
        specific = {"head_dim": 16, "state_size": 8, "chunk_size": 8}
    return CLASSES[backbone][0](**{**common, **specific, **overrides})


def tiny_model(backbone: str, head: bool = True, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_config(backbone, **overrides)
    model_class = CLASSES[backbone][2 if head else 1]
    return model_class(config).eval()


def batch(lengths: tuple[int, ...] = (LENGTH, 11), length: int = LENGTH) -> dict[str, torch.Tensor]:
    """Right-padded batch: <cls> then random gene ids (>= 8), pad 0."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(8, VOCAB, (len(lengths), length), generator=generator)
    input_ids[:, 0] = 2
    positions = torch.arange(length)
    attention_mask = (positions < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class FakeVocab:
    size: int = VOCAB
    sha256: str = "a" * 64
    pad_id: int = 0
    mask_id: int = 1
    cls_id: int = 2

    def __len__(self) -> int:
        return self.size


@dataclass
class FakeTokenizer:
    name: str = "cf-test-v1"
    vocab: FakeVocab = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.vocab = self.vocab or FakeVocab()


# ---------------------------------------------------------------- loading and registration


@pytest.mark.parametrize("backbone", BACKBONES)
def test_auto_classes_resolve_both_backbones(backbone: str) -> None:
    config_class, model_class, mgm_class = CLASSES[backbone]
    config = tiny_config(backbone)
    assert config.model_type.startswith("cellfoundry-")
    assert isinstance(AutoConfig.for_model(config.model_type), config_class)
    assert type(AutoModel.from_config(config)) is model_class
    assert type(AutoModelForMaskedLM.from_config(config)) is mgm_class


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_pretrained_round_trip_is_bit_equal(backbone: str, tmp_path) -> None:
    model = tiny_model(backbone, tokenizer_id="cf-test-v1", vocab_sha256="b" * 64)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tokenizer_id"] == "cf-test-v1" and saved["vocab_sha256"] == "b" * 64

    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    encoder = load_model(str(tmp_path))
    assert type(encoder) is CLASSES[backbone][1]


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("backbone", BACKBONES)
def test_context_ids_condition_every_position_without_shifting(backbone: str) -> None:
    model = tiny_model(backbone, head=False)
    inputs = batch()
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        absent = model(**inputs, context_ids=torch.zeros(2, 3, dtype=torch.long)).last_hidden_state
        context = torch.tensor([[4, 5, 6], [4, 7, 0]])
        with_context = model(**inputs, context_ids=context).last_hidden_state
    assert with_context.shape == plain.shape
    torch.testing.assert_close(absent, plain)  # pad id means "no context"
    real = inputs["attention_mask"].bool()
    assert (with_context - plain)[real].abs().amax(-1).min() > 1e-4  # every real token moves


@pytest.mark.parametrize("backbone", BACKBONES)
def test_learned_positions_cover_max_position_embeddings(backbone: str) -> None:
    model = tiny_model(backbone, head=False, max_position_embeddings=LENGTH)
    assert model.embeddings.position_embeddings.weight.shape == (LENGTH, 32)
    assert model.embeddings.position_embeddings.weight.requires_grad
    too_long = batch(lengths=(LENGTH + 1,), length=LENGTH + 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**too_long)
    assert tiny_config(backbone, max_position_embeddings=4096).max_position_embeddings == 4096


def test_tokenizer_mismatch_raises_naming_both_sides() -> None:
    tokenizer = FakeTokenizer()
    config = CellBertConfig.from_tokenizer(tokenizer, hidden_size=32, num_attention_heads=4)
    assert (config.vocab_size, config.tokenizer_id, config.vocab_sha256) == (
        VOCAB,
        "cf-test-v1",
        "a" * 64,
    )
    check_tokenizer_compatible(config, tokenizer)

    other = FakeTokenizer(name="cf-mouse-v2", vocab=FakeVocab(sha256="c" * 64))
    with pytest.raises(ValueError, match="cf-test-v1") as error:
        check_tokenizer_compatible(CellBertModel(config), other)
    message = str(error.value)
    assert "cf-mouse-v2" in message and "a" * 64 in message and "c" * 64 in message
    assert "load_tokenizer" in message

    with pytest.raises(ValueError, match="vocab_size"):
        check_tokenizer_compatible(config, FakeTokenizer(vocab=FakeVocab(size=VOCAB + 1)))
    unnamed = CellMambaConfig(vocab_size=VOCAB, hidden_size=32, head_dim=16)
    check_tokenizer_compatible(unnamed, other)  # test models record no tokenizer: sizes only


# ---------------------------------------------------------------- attention


def test_attention_projections_are_linear_and_bidirectional() -> None:
    model = tiny_model("bert", head=False)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    for layer in model.layers:
        for name in ("query", "key", "value", "out_proj"):
            assert isinstance(getattr(layer.attention, name), nn.Linear)
        assert layer.attention.is_causal is False


def test_eager_matches_sdpa_with_padding(tmp_path) -> None:
    tiny_model("bert").save_pretrained(tmp_path)
    inputs = batch(lengths=(LENGTH, 11, 3), length=LENGTH)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = CellBertForMaskedGeneModeling.from_pretrained(
            tmp_path, attn_implementation=implementation
        ).eval()
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(**inputs).logits
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed"
)
def test_flash_attention_without_flash_attn_raises_clear_error(tmp_path) -> None:
    tiny_model("bert").save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="FlashAttention2"):
        CellBertForMaskedGeneModeling.from_pretrained(
            tmp_path, attn_implementation="flash_attention_2"
        )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_matches_sdpa_on_gpu(tmp_path) -> None:
    tiny_model("bert").save_pretrained(tmp_path)
    inputs = {k: v.cuda() for k, v in batch(lengths=(LENGTH, 11, 3)).items()}
    outputs = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = CellBertModel.from_pretrained(
            tmp_path, attn_implementation=implementation, dtype=torch.bfloat16
        )
        model = model.cuda().eval()
        with torch.no_grad():
            outputs[implementation] = model(**inputs).last_hidden_state.float()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(
        outputs["flash_attention_2"][real], outputs["sdpa"][real], atol=3e-2, rtol=3e-2
    )


# ---------------------------------------------------------------- padding and direction


@pytest.mark.parametrize("backbone", BACKBONES)
def test_outputs_at_real_tokens_ignore_appended_padding(backbone: str) -> None:
    model = tiny_model(backbone)
    short = batch(lengths=(LENGTH, 11))
    padded = {k: nn.functional.pad(v, (0, 21)) for k, v in short.items()}  # crosses chunks
    alone = {k: v[1:, :11] for k, v in short.items()}
    with torch.no_grad():
        reference = model(**short).logits
        more_padding = model(**padded).logits
        unpadded = model(**alone).logits
    real = short["attention_mask"].bool()
    torch.testing.assert_close(
        more_padding[:, :LENGTH][real], reference[real], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(unpadded[0], reference[1, :11], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_token_sees_later_tokens(backbone: str) -> None:
    model = tiny_model(backbone, head=False)
    inputs = batch(lengths=(LENGTH,))
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, LENGTH - 1] = 3 if inputs["input_ids"][0, -1] != 3 else 4
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        after = model(**changed).last_hidden_state
    # <cls> reads the last gene. A causal model would give bit-identical outputs here: masked
    # terms are exact zeros. (At initialisation the Mamba path is small, so no threshold.)
    assert (after[0, 0] - before[0, 0]).abs().max() > 0
    assert (after[0, 1:-1] - before[0, 1:-1]).abs().amax(-1).min() > 0


def test_flip_index_reverses_within_valid_length() -> None:
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    index = valid_length_flip_index(mask, 3, 4, mask.device)
    assert index.tolist() == [[3, 2, 1, 0], [1, 0, 2, 3], [0, 1, 2, 3]]
    assert torch.equal(index.gather(1, index), torch.arange(4).expand(3, 4))


def test_mamba_rejects_left_padding() -> None:
    model = tiny_model("mamba", head=False)
    inputs = batch(lengths=(LENGTH, 11))
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="right-padded"):
        model(**inputs)


# ---------------------------------------------------------------- masked-gene head


@pytest.mark.parametrize("backbone", BACKBONES)
def test_masked_gene_head_is_tied_and_scores_only_labelled_positions(backbone: str) -> None:
    model = tiny_model(backbone)
    assert model.config.tie_word_embeddings
    assert model.head.decoder.weight is model.get_input_embeddings().weight
    inputs = batch()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, 3], labels[0, 7], labels[1, 5] = 9, 10, 11
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        full = model(**inputs).logits
    assert isinstance(output, MaskedLMOutput)
    assert output.logits.shape == (3, VOCAB) and full.shape == (2, LENGTH, VOCAB)
    selected = labels != -100
    torch.testing.assert_close(output.logits, full[selected], atol=1e-5, rtol=1e-5)
    expected = nn.functional.cross_entropy(full[selected], labels[selected])
    torch.testing.assert_close(output.loss, expected, atol=1e-5, rtol=1e-5)

    nothing = model(**inputs, labels=torch.full_like(labels, -100))
    assert nothing.loss.item() == 0.0 and nothing.logits.shape == (0, VOCAB)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_cpu_fp32_training_steps_lower_the_loss(backbone: str) -> None:
    model = tiny_model(backbone).train()  # plain eager PyTorch, no torch.compile
    inputs = batch()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 2:6] = inputs["input_ids"][:, 2:6]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ---------------------------------------------------------------- checkpointing and pooling


@pytest.mark.parametrize("backbone", BACKBONES)
def test_activation_checkpointing_recomputes_layers(backbone: str) -> None:
    model = tiny_model(backbone).train()
    inner = "attention.query" if backbone == "bert" else "mixer.in_proj"
    probe = model.get_submodule(f"{model.base_model_prefix}.layers.0.{inner}")
    calls = []
    probe.register_forward_hook(lambda *_: calls.append(1))
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def forward_backward() -> dict[str, torch.Tensor]:
        calls.clear()
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = forward_backward()
    assert len(calls) == 1
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.base_model.layers)
    checkpointed = forward_backward()
    assert len(calls) == 2  # the layer ran again in backward instead of storing activations
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4)


def test_pooling_strategies_respect_padding() -> None:
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.equal(pool_hidden_states(hidden, mask, "cls"), hidden[:, 0])
    mean = pool_hidden_states(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[0, 1:3].mean(0))
    torch.testing.assert_close(mean[1], hidden[1, 0])  # no gene token: falls back to <cls>
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "max")[0], hidden[0, 2])
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, mask, "sum")  # type: ignore[arg-type]


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backbone", BACKBONES)
def test_models_run_in_bf16_on_gpu(backbone: str) -> None:
    model = tiny_model(backbone).to("cuda", torch.bfloat16).train()
    inputs = {k: v.cuda() for k, v in batch().items()}
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- benchmark smoke test


def test_encoder_throughput_benchmark_runs_on_a_tiny_grid(tmp_path) -> None:
    """In-process (a subprocess would spend ~3 s importing torch); timings are not checked."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_throughput.py"
    spec = importlib.util.spec_from_file_location("encoder_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "bench.json"
    argv = ["--sizes", "tiny", "--lengths", "16", "32", "--repeats", "1", "--vocab", "64"]
    threads = torch.get_num_threads()
    try:
        report = module.main([*argv, "--output", str(output)])
    finally:
        torch.set_num_threads(threads)  # main() sets the benchmark's thread count
    saved = json.loads(output.read_text())
    assert saved["environment"]["torch_threads"] >= 1 and output.with_suffix(".md").is_file()
    measured = {(r["backend"], r["mode"], r["length"]) for r in report["results"]}
    assert measured == {
        (b, m, L)
        for b in ("eager", "sdpa", "mamba")
        for m in ("forward", "train")
        for L in (16, 32)
    }
    assert set(saved["summary"]) == {"tiny/forward", "tiny/train"}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padding_mask_is_built_over_keys_only(implementation):
    from cellfoundry.models.cellbert.modeling_cellbert import key_padding_mask

    config = CellBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1)
    config._attn_implementation = implementation
    hidden = torch.zeros(2, 5, 32)
    assert key_padding_mask(config, hidden, torch.ones(2, 5, dtype=torch.long)) is None
    mask = key_padding_mask(config, hidden, torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))
    assert mask.shape == (2, 1, 1, 5)
    blocked = ~mask if implementation == "sdpa" else mask < 0
    assert blocked[:, 0, 0].tolist() == [[False] * 3 + [True] * 2, [False] * 5]
