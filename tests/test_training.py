"""cellfoundry.training: run args, optimizer groups, schedules, metrics and exact resume."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM

from cellfoundry.data import MaskedGeneCollator, TokenizedCells
from cellfoundry.models import (
    CellBertConfig,
    CellBertForMaskedGeneModeling,
    CellMambaConfig,
    CellMambaForMaskedGeneModeling,
)
from cellfoundry.training import (
    PretrainingArgs,
    build_optimizer,
    build_scheduler,
    load_pretraining_config,
    masked_gene_counts,
    model_config_kwargs,
    read_log,
    resolve_mixed_precision,
    train,
)

VOCAB_SIZE, FIRST_GENE = 64, 8


def tiny_model(kind: str) -> torch.nn.Module:
    """Design-doc test size (hidden 32, 2 layers, vocab 64, L 32), dropout on."""
    torch.manual_seed(0)
    shared = {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "num_hidden_layers": 2}
    shared["max_position_embeddings"] = 32
    if kind == "bert":
        config = CellBertConfig(**shared, num_attention_heads=2, intermediate_size=64)
        return CellBertForMaskedGeneModeling(config)
    config = CellMambaConfig(**shared, state_size=8, head_dim=16, chunk_size=8)
    return CellMambaForMaskedGeneModeling(config)


def tiny_cells(n_cells: int = 48) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n_cells):
        genes = rng.choice(np.arange(FIRST_GENE, VOCAB_SIZE), int(rng.integers(4, 16)), False)
        rows.append({"input_ids": [2, *genes.tolist()], "context_ids": [4, 5, 6]})
    return datasets.Dataset.from_list(rows)


def run_args(output_dir, **changes) -> PretrainingArgs:
    settings = {
        "output_dir": str(output_dir),
        "batch_size": 8,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 2,
        "save_every": 3,
        "save_total_limit": 1,
        "progress_bar": False,
    }
    return PretrainingArgs(**{**settings, **changes})


def test_pretraining_args_yaml_round_trip_and_conversion(tmp_path):
    args = PretrainingArgs(output_dir=str(tmp_path), learning_rate="3e-4", max_length="null")
    assert args.learning_rate == 3e-4 and args.max_length is None
    path = args.save()
    assert path.name == "run_args.yaml"
    assert PretrainingArgs.load(tmp_path) == args
    assert PretrainingArgs(data="one/folder").data == ["one/folder"]
    assert args.with_overrides({"batch_size": "64"}).batch_size == 64
    assert PretrainingArgs(warmup_ratio=0.1, max_steps=1000).num_warmup_steps == 100
    assert PretrainingArgs(warmup_steps=50, max_steps=2).num_warmup_steps == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lerning_rate": 1e-3}, "did you mean 'learning_rate'"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"batch_size": 2.5}, "not a valid int"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_pretraining_args_reject_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        PretrainingArgs.from_dict(changes)


def test_load_pretraining_config_sections_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  type: bert\n  hidden_size: 32\n"
        "training:\n  learning_rate: 1e-3\n  max_steps: 10\n"
    )
    spec, args = load_pretraining_config(path, ["model.hidden_size=64", "max_steps=2"])
    assert spec == {"type": "bert", "hidden_size": 64}
    assert (args.learning_rate, args.max_steps) == (1e-3, 2)
    with pytest.raises(ValueError, match="key=value"):
        load_pretraining_config(path, ["max_steps"])
    path.write_text("model: {}\ntrainng: {}\n")
    with pytest.raises(ValueError, match="top-level section"):
        load_pretraining_config(path)


def test_model_config_kwargs_convert_and_reject():
    kwargs = model_config_kwargs(CellBertConfig, {"hidden_size": "64", "layer_norm_eps": "1e-5"})
    assert kwargs == {"hidden_size": 64, "layer_norm_eps": 1e-5}
    with pytest.raises(ValueError, match="hidden_size"):
        model_config_kwargs(CellBertConfig, {"hiden_size": 64})
    with pytest.raises(ValueError, match="set from the tokenizer"):
        model_config_kwargs(CellMambaConfig, {"vocab_size": 10})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default")
def test_mixed_precision_auto_is_fp32_on_cpu():
    assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_mixed_precision("fp8")


@pytest.mark.parametrize("kind", ["bert", "mamba"])
def test_optimizer_exempts_biases_and_norms_from_decay(kind):
    model = tiny_model(kind)
    decayed, exempt = build_optimizer(model, 1e-3, weight_decay=0.1).param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    exempt_ids = {id(p) for p in exempt["params"]}
    for name, parameter in model.named_parameters():
        is_exempt = name.endswith("bias") or "norm" in name or parameter.ndim < 2
        assert (id(parameter) in exempt_ids) == is_exempt, name
    embedding = model.get_input_embeddings().weight
    assert any(p is embedding for p in decayed["params"])  # tied decoder counted once
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def test_scheduler_warms_up_then_decays_to_the_floor():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine", 4, 20, min_lr_ratio=0.1)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)
    linear = build_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "linear", 0, 10
    )
    assert linear.get_last_lr()[0] == 1.0
    with pytest.raises(ValueError, match="Warm-up"):
        build_scheduler(optimizer, "cosine", 30, 20)


def test_held_groups_start_their_schedule_late_while_the_others_train():
    body, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [body]}, {"params": [head], "lr": 2.0}], lr=1.0)
    scheduler = build_scheduler(optimizer, "linear", 2, 10, held_groups=[0], held_steps=4)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert [r[0] for r in rates[:4]] == [0.0] * 4  # held: the encoder does not move
    assert [r[0] for r in rates[4:7]] == pytest.approx([0.0, 0.5, 1.0])  # its own warm-up
    assert [r[1] for r in rates[:3]] == pytest.approx([0.0, 1.0, 2.0])  # the head from step 0
    with pytest.raises(ValueError, match="never train"):
        build_scheduler(optimizer, "linear", 0, 10, held_groups=[0], held_steps=10)


def test_masked_gene_counts_top1_and_top10():
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[1, 2], labels[1, 3] = 5, 7, 9
    logits = torch.zeros(3, 20)
    logits[0, 5] = 3.0  # first target ranked 1st
    logits[1, :12] = torch.arange(12, 0, -1).float()  # target 7 ranked 8th
    logits[2, 9] = -1.0  # target 9 ranked last
    assert masked_gene_counts(logits, labels).tolist() == [3.0, 1.0, 2.0]
    full = torch.zeros(2, 4, 20)
    full[labels != -100] = logits
    assert masked_gene_counts(full, labels).tolist() == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="labelled"):
        masked_gene_counts(logits[:2], labels)


class JobKilledError(Exception):
    """Stands in for a killed job."""


@pytest.mark.parametrize("kind", ["bert", "mamba"])
def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tmp_path, kind):
    """Stop after step 3 (mid-epoch, mid-schedule), resume, and compare every later step.

    48 cells: 40 train (5 batches of 8 per epoch), 8 eval. Two batches per optimizer step, so
    step 3 ends one batch into epoch 1: the resume must restore weights, AdamW, scheduler,
    dropout RNG and epoch position and skip exactly one batch. Dropout is on, so a wrong RNG
    state changes the losses.
    """
    dataset = tiny_cells()
    train_cells, eval_cells = (
        TokenizedCells(dataset, range(40)),
        TokenizedCells(dataset, range(40, 48)),
    )

    def fit(output_dir, **changes):
        collator = MaskedGeneCollator(vocab_size=VOCAB_SIZE, first_gene_id=FIRST_GENE, seed=0)
        return train(
            tiny_model(kind),
            train_cells,
            collator,
            run_args(output_dir, **changes.pop("args", {})),
            eval_cells=eval_cells,
            **changes,
        )

    def stop_after_step_3(state, record):
        if state.step == 3:
            raise JobKilledError

    fit(tmp_path / "straight")
    with pytest.raises(JobKilledError):
        fit(tmp_path / "cut", callbacks=[stop_after_step_3])
    assert [r["step"] for r in read_log(tmp_path / "cut")] == [1, 2, 3]
    result = fit(tmp_path / "cut", args={"resume_from_checkpoint": "latest"})

    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_top1", "eval_top10"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key
    assert result.step == 6 and result.eval_metrics["eval_masked_genes"] > 0
    checkpoints = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000006"]  # save_total_limit=1 pruned step 3
    a = AutoModelForMaskedLM.from_pretrained(tmp_path / "straight")
    b = AutoModelForMaskedLM.from_pretrained(tmp_path / "cut")
    for (name, left), right in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(left, right), name
    with pytest.raises(ValueError, match="already holds a run"):
        fit(tmp_path / "straight")


def test_parameter_groups_give_a_prefix_its_own_learning_rate() -> None:
    from torch import nn

    from cellfoundry.training import parameter_groups

    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    groups = parameter_groups(model, 0.01, {"head.": 5e-3})
    by_lr = {(g.get("lr"), g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {
        (None, 0.01): {id(model.body.weight)},
        (None, 0.0): {id(model.body.bias)},
        (5e-3, 0.01): {id(model.head.weight)},
        (5e-3, 0.0): {id(model.head.bias)},
    }
    assert len(parameter_groups(model, 0.01)) == 2  # no prefixes: the usual two groups
