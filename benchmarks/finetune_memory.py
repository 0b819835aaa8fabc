"""Memory and time of LoRA vs full fine-tuning, at the shipped size and at a 40M-parameter size.

The annotation benchmark's peak RSS is the whole process (Python, torch, data, baselines); on
the 3.3M-parameter shipped encoder the trainable weights are a few MiB of it, so LoRA cannot
show a saving there. This script isolates training: each run is its own process that loads
the encoder, tokenizes DLPFC spots (long cells, up to ``--length`` tokens), and takes
``--steps`` AdamW steps of an annotation head (LoRA r=8 on query/key/value/out_proj, or every
weight). Reported per model and mode: trainable share, resident memory after loading, peak
resident memory (``ru_maxrss`` of the process), the growth in between (what training adds:
gradients, optimizer state, activations), and the median step time. Modes of one model run
back to back, interleaved over ``--repeats`` rounds, so load drift hits both.

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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "spatial_dlpfc_visium_maynard2021.h5ad"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "finetune_memory"
MODES = ("lora", "full")
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
    """One measured run: load, tokenize, train ``steps`` steps; print a JSON line."""
    import numpy as np
    import torch

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
    config = AnnotationConfig(base_model=args.model, tuning=args.mode, labels=labels)
    model = build_task_model(config, backbone).train()
    collator = CellBatchCollator(tokenizer.vocab.pad_id, args.length, pad_to_multiple_of=8)
    optimizer = build_optimizer(model, 1e-4, 0.01, learning_rates={"head.": 1e-3})
    loaded = _rss_kib()
    cells = [dataset[i] for i in range(len(dataset))]
    times, saved_peak = [], 0
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for step in range(args.steps):
        batch = collator(cells[step * args.batch_size : (step + 1) * args.batch_size])
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # weights are counted once, below
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        saved_peak = max(saved_peak, sum(saved.values()))
    mib = 2**20
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gradient_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )
    state_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.ndim > 0
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    tokens = int(np.mean([len(c["input_ids"]) for c in cells]))
    print(
        json.dumps(
            {
                "loaded_rss_mib": loaded / 1024,
                "trainable": trainable,
                "total": total,
                "step_s_median": statistics.median(times[1:] or times),
                "mean_tokens": tokens,
                "tensor_mib": {
                    "weights": weight_bytes / mib,
                    "saved_activations": saved_peak / mib,
                    "gradients": gradient_bytes / mib,
                    "optimizer_state": state_bytes / mib,
                    "total": (weight_bytes + saved_peak + gradient_bytes + state_bytes) / mib,
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


def main(argv: list[str] | None = None) -> dict:
    from cellfoundry._benchmarking import (
        command_line,
        git_state,
        package_version,
        run_measured,
        write_report,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="cellfoundry-tiny-bert", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024, help="tokens per cell (cap)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            model = "cellfoundry-tiny-bert"
            if SIZES[size] is not None:
                model = save_random_model(SIZES[size], Path(scratch) / size)
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    command = [
                        sys.executable,
                        __file__,
                        "--child",
                        "--model",
                        model,
                        "--mode",
                        mode,
                        "--steps",
                        str(args.steps),
                        "--batch-size",
                        str(args.batch_size),
                        "--length",
                        str(args.length),
                        "--threads",
                        str(args.threads),
                    ]
                    log = Path(scratch) / "child.log"
                    usage = run_measured(command, log, f"{size} {mode}")
                    result = json.loads(log.read_text().strip().splitlines()[-1])
                    result["peak_rss_mib"] = usage["maxrss_kib"] / 1024
                    runs[mode].append(result)
            for mode in MODES:
                median = {
                    k: statistics.median(r[k] for r in runs[mode])
                    for k in ("loaded_rss_mib", "peak_rss_mib", "step_s_median")
                }
                median["tensor_mib"] = statistics.median(
                    r["tensor_mib"]["total"] for r in runs[mode]
                )
                first = runs[mode][0]
                rows.append(
                    {
                        "size": size,
                        "mode": mode,
                        "parameters": first["total"],
                        "trainable_share": first["trainable"] / first["total"],
                        "loaded_rss_mib": median["loaded_rss_mib"],
                        "peak_rss_mib": median["peak_rss_mib"],
                        "training_growth_mib": median["peak_rss_mib"] - median["loaded_rss_mib"],
                        "step_s": median["step_s_median"],
                        "mean_tokens": first["mean_tokens"],
                        "tensor_mib": median["tensor_mib"],
                        "tensor_parts_mib": first["tensor_mib"],
                        "rounds": runs[mode],
                    }
                )
    ratios = {}
    for size in args.sizes:
        lora, full = (next(r for r in rows if r["size"] == size and r["mode"] == m) for m in MODES)
        ratios[size] = {
            "peak_rss_lora_over_full": lora["peak_rss_mib"] / full["peak_rss_mib"],
            "growth_lora_over_full": lora["training_growth_mib"] / full["training_growth_mib"],
            "step_time_lora_over_full": lora["step_s"] / full["step_s"],
            "tensor_memory_lora_over_full": lora["tensor_mib"] / full["tensor_mib"],
        }
    report = {
        "benchmark": NAME,
        "rows": rows,
        "ratios": ratios,
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("out", "child", "model", "mode")
        },
        "environment": {
            "command": command_line(),
            "git": git_state(ROOT),
            "torch": package_version("torch"),
            "peft": package_version("peft"),
            "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    lines = [
        "# LoRA vs full fine-tuning: memory and step time",
        "",
        f"{args.steps} AdamW steps of {args.batch_size} DLPFC spots (≤ {args.length} tokens, or "
        "the model's context if shorter), "
        f"annotation head, {args.threads} thread(s), CPU; medians of {args.repeats} interleaved "
        "rounds. Growth = peak RSS minus RSS after loading (gradients, optimizer state, "
        "activations). Tensor memory = weights + activations saved for backward (largest "
        "step) + gradients + AdamW state, counted from the tensors themselves: what a GPU's "
        "caching allocator would have to hold, free of the CPU allocator's fragmentation (LoRA "
        "makes more short-lived temporaries, which glibc does not hand back to the system, so "
        "RSS overstates its memory).",
        "",
        "| size | mode | parameters | trainable | loaded MiB | peak MiB | growth MiB | "
        "tensor MiB (weights / saved act. / grads / AdamW) | step s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['parameters'] / 1e6:.1f}M | "
            f"{100 * r['trainable_share']:.2f}% | {r['loaded_rss_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['training_growth_mib']:.0f} | {r['tensor_mib']:.0f} ("
            + " / ".join(
                f"{r['tensor_parts_mib'][k]:.0f}"
                for k in ("weights", "saved_activations", "gradients", "optimizer_state")
            )
            + f") | {r['step_s']:.3f} |"
        )
    lines += [
        "",
        "| size | tensor memory LoRA/full | peak RSS LoRA/full | growth LoRA/full | "
        "step time LoRA/full |",
        "|---|---:|---:|---:|---:|",
    ]
    for size, ratio in ratios.items():
        lines.append(
            f"| {size} | {ratio['tensor_memory_lora_over_full']:.2f} | "
            f"{ratio['peak_rss_lora_over_full']:.2f} | "
            f"{ratio['growth_lora_over_full']:.2f} | "
            f"{ratio['step_time_lora_over_full']:.2f} |"
        )
    markdown = "\n".join(lines) + "\n"
    write_report(args.out / f"{NAME}.json", report, markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
