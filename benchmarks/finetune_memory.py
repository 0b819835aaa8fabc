"""Memory and time of LoRA vs full fine-tuning, at the shipped size and at a 40M-parameter size.

The annotation benchmark's peak RSS is the whole process (Python, torch, data, baselines); on
the 3.3M-parameter shipped encoder the trainable weights are a few MiB of it, so LoRA cannot
show a saving there. This script isolates training: each run is its own process that loads
the encoder, tokenizes DLPFC spots (long cells, up to ``--length`` tokens), and takes
``--steps`` AdamW steps of an annotation head (each LoRA variant of
``cellfoundry.bench.lora_variants``, or every weight),
without and with gradient checkpointing.

Reported per size, checkpointing setting and mode: trainable share; peak tensor memory of the
last step (``cellfoundry.bench.tensor_memory``: the CPU counterpart of a GPU's
``max_memory_allocated``, on which the ">= 40% less peak memory" target is judged); resident
memory after loading and at its peak (``ru_maxrss``) and the growth in between; the median
step time. The modes of a setting run back to back, interleaved over ``--repeats`` rounds,
so load drift hits them alike.

    python benchmarks/finetune_memory.py                      # shipped and 40M, 3 rounds
    python benchmarks/finetune_memory.py --sizes shipped --repeats 1 --steps 3

Writes ``benchmarks/results/finetune_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cellfoundry.bench.lora_variants import LORA_VARIANTS, task_fields

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "spatial_dlpfc_visium_maynard2021.h5ad"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "finetune_memory"
# the LoRA variants of cellfoundry.bench.lora_variants (every linear layer, the project's
# default; attention only, which keeps no input of the feed-forward layers for backward; and
# attention only with A frozen, which keeps no input of an adapted layer either)
MODES = (*LORA_VARIANTS, "full")
SIZES = {
    "shipped": None,  # cellfoundry-tiny-bert as shipped (context 256 tokens)
    "40M": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
    },
}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """One measured run: load, tokenize, take ``steps`` steps; print a JSON line.

    The first ``steps - 1`` steps are timed; the last one runs under :class:`PeakTensorMemory`
    (which slows every op, so it is not timed), after the optimizer state exists: its peak is
    the steady state's.
    """
    import numpy as np
    import torch

    from cellfoundry.bench.tensor_memory import PeakTensorMemory
    from cellfoundry.data import CellBatchCollator
    from cellfoundry.embedding import _tokenizer_for
    from cellfoundry.models import load_model
    from cellfoundry.tasks import AnnotationConfig, build_task_model
    from cellfoundry.tasks.finetune import read_labelled, tokenize_cells
    from cellfoundry.training import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_model(args.model, masked_gene_head=False)
    tokenizer = _tokenizer_for(backbone, None)
    args.length = min(args.length, backbone.config.max_position_embeddings)
    adata = read_labelled(DATA, "region")
    adata = adata[: args.batch_size * args.steps].copy()
    dataset = tokenize_cells(adata, tokenizer, args.length, False)
    labels = sorted(adata.obs["region"].astype(str).unique())
    lookup = {label: i for i, label in enumerate(labels)}
    codes = [lookup[str(v)] for v in adata.obs["region"].to_numpy()[dataset["row"]]]
    dataset = dataset.add_column("labels", codes)
    config = AnnotationConfig(base_model=args.model, labels=labels, **task_fields(args.mode))
    model = build_task_model(config, backbone).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    collator = CellBatchCollator(tokenizer.vocab.pad_id, args.length, pad_to_multiple_of=8)
    optimizer = build_optimizer(model, 1e-4, 0.01, learning_rates={"head.": 1e-3})
    loaded = _rss_kib()
    cells = [dataset[i] for i in range(len(dataset))]

    def step(index: int) -> None:
        batch = collator(cells[index * args.batch_size : (index + 1) * args.batch_size])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for index in range(args.steps - 1):
        start = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - start)
    state = [
        value
        for values in optimizer.state.values()
        for value in values.values()
        if torch.is_tensor(value) and value.ndim > 0
    ]
    with PeakTensorMemory([*model.parameters(), *model.buffers(), *state]) as tracked:
        step(args.steps - 1)
    mib = 2**20
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        json.dumps(
            {
                "loaded_rss_mib": loaded / 1024,
                "trainable": sum(p.numel() for p in trainable),
                "total": sum(p.numel() for p in model.parameters()),
                "step_s_median": statistics.median(times[1:] or times),
                "mean_tokens": int(np.mean([len(c["input_ids"]) for c in cells])),
                "peak_tensor_mib": tracked.peak / mib,
                "tensor_parts_mib": {
                    "weights": sum(p.nbytes for p in model.parameters()) / mib,
                    "gradients": sum(p.nbytes for p in trainable) / mib,
                    "optimizer_state": sum(v.nbytes for v in state) / mib,
                },
            }
        )
    )


def save_random_model(size: dict, folder: Path) -> str:
    """A randomly initialised CellBert of ``size`` with the shipped model's tokenizer."""
    from cellfoundry.models import CellBertConfig, CellBertModel, load_model

    shipped = load_model("cellfoundry-tiny-bert", masked_gene_head=False).config
    settings = {k: v for k, v in shipped.to_dict().items() if k in CellBertConfig().to_dict()}
    config = CellBertConfig(**{**settings, **size})
    CellBertModel(config).save_pretrained(folder)
    return str(folder)


def measure(args: argparse.Namespace, size: str, model: str, scratch: Path) -> list[dict]:
    """The rows of one size: every mode (:data:`MODES`) under each ``--checkpointing``
    setting, over ``--repeats`` rounds; the modes of a setting run back to back in each round."""
    from cellfoundry._benchmarking import run_measured

    rows = []
    for checkpointing in args.checkpointing:
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                command = [sys.executable, __file__, "--child", "--model", model, "--mode", mode]
                for option in ("steps", "batch_size", "length", "threads"):
                    command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
                if checkpointing == "on":
                    command.append("--child-checkpointing")
                log = scratch / "child.log"
                usage = run_measured(command, log, f"{size} {mode} checkpointing {checkpointing}")
                result = json.loads(log.read_text().strip().splitlines()[-1])
                result["peak_rss_mib"] = usage["maxrss_kib"] / 1024
                runs[mode].append(result)
        for mode in MODES:
            median = {
                key: statistics.median(r[key] for r in runs[mode])
                for key in ("loaded_rss_mib", "peak_rss_mib", "step_s_median", "peak_tensor_mib")
            }
            first = runs[mode][0]
            rows.append(
                {
                    "size": size,
                    "checkpointing": checkpointing == "on",
                    "mode": mode,
                    "parameters": first["total"],
                    "trainable_share": first["trainable"] / first["total"],
                    "loaded_rss_mib": median["loaded_rss_mib"],
                    "peak_rss_mib": median["peak_rss_mib"],
                    "training_growth_mib": median["peak_rss_mib"] - median["loaded_rss_mib"],
                    "step_s": median["step_s_median"],
                    "mean_tokens": first["mean_tokens"],
                    "peak_tensor_mib": median["peak_tensor_mib"],
                    "tensor_parts_mib": first["tensor_parts_mib"],
                    "rounds": runs[mode],
                }
            )
    return rows


def lora_over_full(rows: list[dict]) -> list[dict]:
    """LoRA/full ratios (of medians) for each size, checkpointing setting and LoRA variant."""
    ratios = []
    for lora in (r for r in rows if r["mode"] != "full"):
        full = next(
            r
            for r in rows
            if r["mode"] == "full"
            and (r["size"], r["checkpointing"]) == (lora["size"], lora["checkpointing"])
        )
        ratios.append(
            {
                "size": lora["size"],
                "checkpointing": lora["checkpointing"],
                "mode": lora["mode"],
                "peak_tensor_lora_over_full": lora["peak_tensor_mib"] / full["peak_tensor_mib"],
                "peak_rss_lora_over_full": lora["peak_rss_mib"] / full["peak_rss_mib"],
                "growth_lora_over_full": lora["training_growth_mib"] / full["training_growth_mib"],
                "step_time_lora_over_full": lora["step_s"] / full["step_s"],
            }
        )
    return ratios


def markdown(args: argparse.Namespace, rows: list[dict], ratios: list[dict]) -> str:
    # the summary's target, so the table and SUMMARY.md cannot disagree
    from cellfoundry.bench.extract.finetuning import MEMORY_TARGET

    lines = [
        "# LoRA vs full fine-tuning: memory and step time",
        "",
        f"{args.steps} AdamW steps of {args.batch_size} DLPFC spots (≤ {args.length} tokens, or "
        f"the model's context if shorter), annotation head, {args.threads} thread(s), CPU; "
        f"medians of {args.repeats} interleaved rounds; each setting without and with gradient "
        "checkpointing (every mode alike). Modes: `lora` = LoRA r=8 on every linear layer of "
        "the encoder (the project's default targets, used in every fine-tuning benchmark); "
        "`lora_attention` = LoRA r=8 on query/key/value/out_proj only; `lora_fa_attention` = "
        "the same with every A frozen at its random initialisation (LoRA-FA: an adapted "
        "layer's input is needed by no weight gradient); `full` = every weight. The LoRA "
        "variants' accuracy: the same modes in `finetune_annotation.md`.",
        "",
        "- **Peak tensor memory**: the most bytes of tensors alive at once during the last "
        "step (weights, optimizer state, activations, recomputed activations, gradients, "
        "temporaries), counted op by op (`cellfoundry.bench.tensor_memory`). It is what "
        "`torch.cuda.max_memory_allocated` reports on a GPU, and the figure the LoRA target "
        "is judged on.",
        "- **Peak RSS**: the whole process (interpreter, torch, data, glibc's cached blocks); "
        "growth = peak minus RSS after loading. On CPU it overstates LoRA, which makes more "
        "short-lived temporaries that glibc keeps.",
        "",
        "| size | checkpointing | mode | parameters | trainable | peak tensor MiB | "
        "weights / grads / AdamW MiB | loaded MiB | peak RSS MiB | growth MiB | step s |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        parts = r["tensor_parts_mib"]
        lines.append(
            f"| {r['size']} | {'on' if r['checkpointing'] else 'off'} | {r['mode']} | "
            f"{r['parameters'] / 1e6:.1f}M | {100 * r['trainable_share']:.2f}% | "
            f"{r['peak_tensor_mib']:.0f} | {parts['weights']:.0f} / {parts['gradients']:.0f} / "
            f"{parts['optimizer_state']:.0f} | {r['loaded_rss_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['training_growth_mib']:.0f} | {r['step_s']:.3f} |"
        )
    lines += [
        "",
        "LoRA/full (target: peak tensor memory <= 0.60, i.e. at least 40% less):",
        "",
        "| size | checkpointing | mode | peak tensor | target | peak RSS | growth | step time |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for ratio in ratios:
        met = "met" if MEMORY_TARGET.met(ratio["peak_tensor_lora_over_full"], 1.0) else "missed"
        lines.append(
            f"| {ratio['size']} | {'on' if ratio['checkpointing'] else 'off'} | "
            f"{ratio['mode']} | {ratio['peak_tensor_lora_over_full']:.2f} | {met} | "
            f"{ratio['peak_rss_lora_over_full']:.2f} | {ratio['growth_lora_over_full']:.2f} | "
            f"{ratio['step_time_lora_over_full']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from cellfoundry._benchmarking import command_line, git_state, package_version, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="cellfoundry-tiny-bert", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--steps", type=int, default=5, help="the last one is the measured one")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024, help="tokens per cell (cap)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (timed steps, then the measured one)")
    if args.child:
        args.checkpointing = args.child_checkpointing
        child(args)
        return {}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            model = "cellfoundry-tiny-bert"
            if SIZES[size] is not None:
                model = save_random_model(SIZES[size], Path(scratch) / size)
            rows += measure(args, size, model, Path(scratch))
    ratios = lora_over_full(rows)
    report = {
        "benchmark": NAME,
        "rows": rows,
        "ratios": ratios,
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "child", "child_checkpointing", "model", "mode")
        },
        "environment": {
            "command": command_line(),
            "git": git_state(ROOT),
            "torch": package_version("torch"),
            "peft": package_version("peft"),
            "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    text = markdown(args, rows, ratios)
    write_report(args.out / f"{NAME}.json", report, text)
    print(text)
    return report


if __name__ == "__main__":
    main()
