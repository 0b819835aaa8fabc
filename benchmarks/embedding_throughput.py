"""Embedding throughput: ``cellfoundry.embed`` vs a plain ``BertForMaskedLM`` wrapper path.

What is compared (see ``benchmarks/README.md``): cells/s and peak RSS of embedding the same
real cells with two random-initialised models of the same shape (6 layers, hidden 256, 4 heads,
intermediate 1,024, 2,048 positions, the cf-human-v1 vocabulary), the same tokenizer, the same
batch size and CPU thread count, each side in its own child process:

- **cellfoundry**: ``cellfoundry.models.load_model(path)`` (the bare ``CellBertModel``; the
  masked-gene head is never loaded) then ``cellfoundry.embed(adata, model, pooling="mean")``:
  tokenizes on the fly, sorts cells by length within a tokenization chunk, pads each batch to
  its longest cell and runs the encoder alone under ``torch.inference_mode``.
- **baseline** (what current wrappers do; helical's Geneformer ``get_embs`` is the model):
  ``BertForMaskedLM.from_pretrained(path, output_hidden_states=True)``; all cells tokenized
  first (same tokenizer, same tokens); batches in input order (unsorted), each padded to the
  longest cell of the batch; ``model(input_ids, attention_mask)`` under ``torch.no_grad`` (full
  vocabulary logits for every position, all hidden states kept), then ``hidden_states[-1]``
  mean-pooled over the gene tokens. ``--baseline-padding max-length`` pads every batch to 2,048.

Each child reads the same ``.h5ad`` (``--cells`` cells drawn with a seeded RNG from
``../shared/data/pert_kang2018_ifnb_pbmc.h5ad``, raw counts), times its phases (read, model
load, tokenize, forward) and reports its own peak RSS; the parent starts it through a small
fork/exec launcher so ``ru_maxrss`` from ``os.wait4`` is the child's alone. The primary speed is
cells / (read + load + tokenize + forward) inside the child; the launch-to-exit wall time
(interpreter start and imports included) is reported beside it. Ratios are cellfoundry over the
baseline measured in the same run. Timings are measurements of this machine at this moment.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import os
import platform
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellfoundry._benchmarking import (
    command_line,
    cpu_model,
    git_state,
    package_version,
    run_measured,
    write_report,
)
from cellfoundry._io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
RESULTS = ROOT / "benchmarks" / "results"
SOURCE = ROOT.parent / "shared" / "data" / "pert_kang2018_ifnb_pbmc.h5ad"
NAME = "embedding_throughput"
TOKENIZER = "cf-human-v1"
SHAPE = {
    "num_hidden_layers": 6,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 2048,
}
SEED = 0
TARGET_SPEEDUP = 3.0  # issue 5: >= 3x cells/s ...
TARGET_MEMORY_RATIO = 0.25  # ... at <= 0.25x peak RSS
MIB = 2**20


# -- inputs ---------------------------------------------------------------------------------
def build_cells_file(n_cells: int, seed: int, work: Path) -> dict:
    """Write ``n_cells`` Kang 2018 cells (seeded draw, input order kept) as an ``.h5ad``."""
    import anndata as ad
    import scipy.sparse as sp

    path = work / f"kang2018_{n_cells}cells_seed{seed}.h5ad"
    src = ad.read_h5ad(SOURCE)
    if n_cells > src.n_obs:
        raise ValueError(f"--cells {n_cells} > {src.n_obs} cells in {SOURCE.name}")
    rows = np.sort(np.random.default_rng(seed).choice(src.n_obs, n_cells, replace=False))
    sub = ad.AnnData(
        X=sp.csr_matrix(src.X[rows], dtype=np.float32),
        obs=src.obs.iloc[rows][["perturbation", "batch"]].copy(),
        var=src.var[["ensembl_id"]].copy(),
    )
    sub.write_h5ad(path)
    nnz = np.diff(sub.X.indptr)
    return {
        "path": str(path),
        "source": SOURCE.name,
        "source_sha256": sha256_file(SOURCE),
        "sha256": sha256_file(path),
        "n_cells": n_cells,
        "n_genes": int(sub.n_vars),
        "seed": seed,
        "selection": "np.random.default_rng(seed).choice(n_obs, n_cells, replace=False), sorted",
        "mean_nonzero_genes_per_cell": round(float(nnz.mean()), 1),
    }


def build_models(work: Path) -> dict:
    """Random-initialised CellBert (as training builds it) and BertForMaskedLM, same shape."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from cellfoundry.models import CellBertConfig, CellBertForMaskedGeneModeling
    from cellfoundry.tokenization import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    torch.manual_seed(SEED)
    # CellBertConfig.from_tokenizer records tokenizer_id and vocab_sha256, as
    # cellfoundry.training.loop.build_masked_gene_model does for a pretraining run.
    ours = CellBertForMaskedGeneModeling(CellBertConfig.from_tokenizer(tokenizer, **SHAPE))
    ours_path = work / "model_cellbert"
    ours.save_pretrained(ours_path)
    vocab = tokenizer.vocab
    torch.manual_seed(SEED)
    baseline = BertForMaskedLM(
        BertConfig(
            vocab_size=len(vocab),
            pad_token_id=int(vocab.pad_id),
            **SHAPE,
        )
    )
    baseline_path = work / "model_bert"
    baseline.save_pretrained(baseline_path)
    return {
        "tokenizer": {
            "id": tokenizer.name,
            "vocab_size": len(vocab),
            "vocab_sha256": vocab.sha256,
            "max_length": tokenizer.max_length,
        },
        "cellfoundry": {
            "path": str(ours_path),
            "class_saved": type(ours).__name__,
            "class_loaded": "CellBertModel (load_model, masked_gene_head=False)",
            "parameters_saved": sum(p.numel() for p in ours.parameters()),
            "config": ours.config.to_diff_dict(),
        },
        "baseline": {
            "path": str(baseline_path),
            "class": type(baseline).__name__,
            "parameters": sum(p.numel() for p in baseline.parameters()),
            "config": baseline.config.to_diff_dict(),
        },
    }


# -- child: one side ------------------------------------------------------------------------
def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _child(args: argparse.Namespace) -> None:
    """Run one side in this (fresh) process; write its timings and memory as JSON."""
    started = time.perf_counter()
    import anndata as ad
    import torch

    import cellfoundry.models  # noqa: F401  (registers the Auto classes; torch, transformers)
    from cellfoundry.tokenization import (
        TokenizeOptions,
        TokenizeReport,
        iter_tokenized,
        load_tokenizer,
    )

    torch.set_num_threads(args.threads)
    phases: dict[str, float] = {"imports": time.perf_counter() - started}
    rss_after_imports = _vm_kib("VmRSS") * 1024

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = now - since
        return now

    profiler = cProfile.Profile() if args._profile else None
    if profiler is not None:
        profiler.enable()
    t = time.perf_counter()
    adata = ad.read_h5ad(args._input)
    t = mark("read_h5ad", t)
    extra: dict = {}
    if args._child == "cellfoundry":
        from cellfoundry import embed
        from cellfoundry.models import load_model

        encoder = load_model(args._model)  # bare encoder, as embed(model=<name>) loads it
        extra["attn_implementation"] = encoder.config._attn_implementation
        extra["model_class"] = type(encoder).__name__
        t = mark("load_model", t)
        vectors = embed(
            adata,
            model=encoder,
            pooling=args.pooling,
            batch_size=args.batch_size,
            device="cpu",
            key_added=None,
            progress=False,
        )
        t = mark("tokenize_and_forward", t)
    else:
        from transformers import BertForMaskedLM

        model = BertForMaskedLM.from_pretrained(args._model, output_hidden_states=True)
        model.eval()
        extra["attn_implementation"] = model.config._attn_implementation
        extra["model_class"] = type(model).__name__
        t = mark("load_model", t)
        tokenizer = load_tokenizer(TOKENIZER)
        options = TokenizeOptions(max_length=model.config.max_position_embeddings)
        report = TokenizeReport(input="<AnnData>")
        cells: list[np.ndarray] = [np.empty(0, np.int64)] * adata.n_obs
        for block in iter_tokenized(adata, tokenizer, options, report):
            offsets = block.ranked.offsets
            for i, row in enumerate(block.rows):
                cells[row] = block.ranked.flat_ids[offsets[i] : offsets[i + 1]].astype(np.int64)
        kept = [i for i, c in enumerate(cells) if c.size > 0]  # input order, not sorted
        t = mark("tokenize", t)
        vectors = np.full((adata.n_obs, model.config.hidden_size), np.nan, np.float32)
        padded_tokens = 0
        with torch.no_grad():
            for lo in range(0, len(kept), args.batch_size):
                rows = kept[lo : lo + args.batch_size]
                lengths = np.array([cells[r].size for r in rows])
                width = int(lengths.max())
                if args.baseline_padding == "max-length":
                    width = model.config.max_position_embeddings
                ids = np.full((len(rows), width), tokenizer.vocab.pad_id, np.int64)
                for j, r in enumerate(rows):
                    ids[j, : lengths[j]] = cells[r]
                mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
                padded_tokens += ids.size
                outputs = model(
                    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                )
                hidden = outputs.hidden_states[-1][:, 1:, :]  # helical "cell" mode: no <cls>
                genes = torch.from_numpy(mask[:, 1:]).unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * genes).sum(1) / genes.sum(1).clamp(min=1)
                vectors[rows] = pooled.numpy()
                del outputs, hidden
        extra["padded_tokens"] = int(padded_tokens)
        extra["real_tokens"] = int(sum(cells[r].size for r in kept))
        t = mark("forward", t)
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(35)
        extra["profile_top_cumulative"] = text.getvalue()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        extra["profile_top_self"] = text.getvalue()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    finite = np.isfinite(vectors).all(axis=1)
    result = {
        "side": args._child,
        "n_cells": int(adata.n_obs),
        "n_cells_embedded": int(finite.sum()),
        "embedding_dim": int(vectors.shape[1]),
        "embedding_sha256": hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest(),
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
        "work_seconds": round(sum(v for k, v in phases.items() if k != "imports"), 3),
        "rss_after_imports_bytes": rss_after_imports,
        "vm_hwm_bytes": _vm_kib("VmHWM") * 1024,
        "child_user_cpu_seconds": round(usage.ru_utime, 2),
        "child_system_cpu_seconds": round(usage.ru_stime, 2),
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
    Path(args._result).write_text(json.dumps(result, indent=2) + "\n")


# -- parent: launch, measure ----------------------------------------------------------------
def run_side(side: str, data: dict, model_path: str, args: argparse.Namespace, work: Path) -> dict:
    """Run one side in a child; its JSON report plus wall time and ru_maxrss from wait4."""
    result_path = work / f"child_{side}.json"
    log = work / f"child_{side}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", side]
    cmd += ["--_input", data["path"], "--_model", model_path, "--_result", str(result_path)]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    cmd += ["--pooling", args.pooling, "--baseline-padding", args.baseline_padding]
    if args.profile and side == "cellfoundry":
        cmd.append("--_profile")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    print(f"{side}: running {data['n_cells']:,} cells ...", flush=True)
    usage = run_measured(cmd, log, f"{side} child", env)
    result = json.loads(result_path.read_text())
    n = result["n_cells"]
    cpu = usage["utime"] + usage["stime"]
    result.update(
        {
            "cells_per_s": round(n / result["work_seconds"], 2),
            "wall_seconds": round(usage["wall"], 3),
            "wall_cells_per_s": round(n / usage["wall"], 2),
            "peak_rss_bytes": int(usage["maxrss_kib"]) * 1024,
            "launcher_vmhwm_bytes": int(usage["launcher_vmhwm_kib"]) * 1024,
            "user_cpu_seconds": round(usage["utime"], 2),
            "system_cpu_seconds": round(usage["stime"], 2),
            "cells_per_cpu_second": round(n / max(cpu, 1e-9), 2),
            "load_average_1min_before": round(load_before, 2),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
        }
    )
    print(
        f"  {side}: {result['cells_per_s']:.2f} cells/s (work {result['work_seconds']:.1f} s; "
        f"phases {result['phases_seconds']}), wall {result['wall_seconds']:.1f} s, peak RSS "
        f"{result['peak_rss_bytes'] / MIB:,.0f} MiB, cpu {cpu:.1f} s, load {load_before:.2f}",
        flush=True,
    )
    return result


def token_counts(data: dict, batch_size: int) -> dict:
    """Real tokens and the padded tokens of both batchings (lengths only; no model)."""
    import anndata as ad

    from cellfoundry.tokenization import (
        TokenizeOptions,
        TokenizeReport,
        iter_tokenized,
        load_tokenizer,
    )

    adata = ad.read_h5ad(data["path"])
    tokenizer = load_tokenizer(TOKENIZER)
    report = TokenizeReport(input="<AnnData>")
    options = TokenizeOptions(max_length=SHAPE["max_position_embeddings"])
    ours_padded, lengths_in_order = 0, np.zeros(adata.n_obs, np.int64)
    n_chunks = 0
    for block in iter_tokenized(adata, tokenizer, options, report):
        n_chunks += 1
        lengths = block.ranked.lengths
        lengths_in_order[block.rows] = lengths
        ordered = np.sort(lengths)[::-1]  # embed(): longest first within a chunk
        for lo in range(0, ordered.size, batch_size):
            part = ordered[lo : lo + batch_size]
            ours_padded += int(part.max()) * part.size
    kept = lengths_in_order[lengths_in_order > 0]
    base_padded = sum(
        int(kept[lo : lo + batch_size].max()) * kept[lo : lo + batch_size].size
        for lo in range(0, kept.size, batch_size)
    )
    return {
        "tokens_per_cell_mean": round(float(kept.mean()), 1),
        "tokens_per_cell_percentiles_0_50_90_100": [
            int(v) for v in np.percentile(kept, [0, 50, 90, 100])
        ],
        "real_tokens": int(kept.sum()),
        "cellfoundry_padded_tokens": ours_padded,
        "baseline_padded_tokens_batch_longest": base_padded,
        "baseline_padded_tokens_max_length": int(kept.size * SHAPE["max_position_embeddings"]),
        "tokenization_chunks": n_chunks,
    }


# -- environment, report --------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict:
    sources = [ROOT / "src" / "cellfoundry" / "embedding.py"]
    sources += sorted((ROOT / "src" / "cellfoundry" / "models").rglob("*.py"))
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads_per_child": args.threads,
        "device": "CPU only",
        "dtype": "float32",
        "versions": {
            name: package_version(name)
            for name in ("cellfoundry", "torch", "transformers", "numpy", "anndata", "numba")
        },
        **git_state(ROOT),
        "source_sha256": {str(p.relative_to(ROOT)): sha256_file(p)[:16] for p in sources},
        "command": command_line(),
    }


def targets(ours: dict, base: dict) -> list[dict]:
    speed = ours["cells_per_s"] / base["cells_per_s"]
    wall = ours["wall_cells_per_s"] / base["wall_cells_per_s"]
    memory = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
    return [
        {
            "target": "cells/s, cellfoundry / baseline (read + load + tokenize + forward)",
            "threshold": f">= {TARGET_SPEEDUP:.1f}x",
            "measured": round(speed, 3),
            "meets_target": speed >= TARGET_SPEEDUP,
        },
        {
            "target": "cells/s, cellfoundry / baseline (launch-to-exit wall, imports included)",
            "threshold": f">= {TARGET_SPEEDUP:.1f}x",
            "measured": round(wall, 3),
            "meets_target": wall >= TARGET_SPEEDUP,
        },
        {
            "target": "peak RSS, cellfoundry / baseline (ru_maxrss of each child)",
            "threshold": f"<= {TARGET_MEMORY_RATIO:.2f}x",
            "measured": round(memory, 3),
            "meets_target": memory <= TARGET_MEMORY_RATIO,
        },
    ]


def markdown(report: dict) -> str:
    env, settings, sides = report["environment"], report["settings"], report["sides"]
    data, tokens = report["input"], report["tokens"]
    lines = [
        "# Embedding throughput",
        "",
        f"{data['n_cells']:,} Kang 2018 PBMC cells (raw counts, seeded draw, "
        f"{tokens['tokens_per_cell_mean']:.0f} tokens/cell on average with {TOKENIZER}), "
        f"random-initialised models of one shape (6 layers, hidden 256, 4 heads, intermediate "
        f"1,024, 2,048 positions), batch {settings['batch_size']}, {settings['threads']} torch "
        f"thread(s) per child, CPU float32, one run per side; torch "
        f"{env['versions']['torch']}, transformers {env['versions']['transformers']}; "
        f"{env['cpu_model']} ({env['cpu_count']} cores). Load average (1 min) "
        f"{sides['cellfoundry']['load_average_1min_before']:.1f} before cellfoundry, "
        f"{sides['baseline']['load_average_1min_before']:.1f} before the baseline: "
        f"{report['contention_note']}",
        "",
        "| side | cells/s | work s | read / load / tokenize / forward s | wall s (launch to "
        "exit) | cells/CPU-s | peak RSS | RSS after imports |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for side in ("cellfoundry", "baseline"):
        r = sides[side]
        p = r["phases_seconds"]
        split = (
            f"{p['read_h5ad']:.1f} / {p['load_model']:.1f} / (streamed) / "
            f"{p['tokenize_and_forward']:.1f}"
            if side == "cellfoundry"
            else f"{p['read_h5ad']:.1f} / {p['load_model']:.1f} / {p['tokenize']:.1f} / "
            f"{p['forward']:.1f}"
        )
        lines.append(
            f"| {report['labels'][side]} | {r['cells_per_s']:.2f} | {r['work_seconds']:.1f} | "
            f"{split} | {r['wall_seconds']:.1f} | {r['cells_per_cpu_second']:.2f} | "
            f"{r['peak_rss_bytes'] / MIB:,.0f} MiB | {r['rss_after_imports_bytes'] / MIB:,.0f} "
            "MiB |"
        )
    lines += [
        "",
        f"Tokens through the encoder: {tokens['real_tokens']:,} real; padded "
        f"{tokens['cellfoundry_padded_tokens']:,} (cellfoundry, sorted) vs "
        f"{report['sides']['baseline']['padded_tokens']:,} (baseline, "
        f"{settings['baseline_padding']}); the baseline also computes "
        f"{report['sides']['baseline']['padded_tokens']:,} x "
        f"{report['models']['tokenizer']['vocab_size']:,} vocabulary logits.",
        "",
        "| target | threshold | measured | meets |",
        "|---|---|---:|:---:|",
    ]
    for row in report["targets"]:
        lines.append(
            f"| {row['target']} | {row['threshold']} | {row['measured']:.2f}x | "
            f"{'yes' if row['meets_target'] else 'no'} |"
        )
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=500, help="cells drawn from Kang 2018")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the cell draw")
    parser.add_argument("--batch-size", type=int, default=24, help="cells per forward (both)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--pooling", default="mean", choices=["cls", "mean", "max"])
    parser.add_argument(
        "--baseline-padding",
        default="batch-longest",
        choices=["batch-longest", "max-length"],
        help="baseline pads each (unsorted) batch to its longest cell (helical) or to 2048",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the cellfoundry child")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and .md")
    parser.add_argument("--name", default=NAME, help="results file stem")
    parser.add_argument("--_child", choices=["cellfoundry", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--_input", help=argparse.SUPPRESS)
    parser.add_argument("--_model", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    parser.add_argument("--_profile", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._child:
        _child(args)
        return None
    WORK.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    with tempfile.TemporaryDirectory(dir=WORK, prefix="embed_") as tmp:
        work = Path(tmp)
        data = build_cells_file(args.cells, args.seed, work)
        models = build_models(work)
        tokens = token_counts(data, args.batch_size)
        print(
            f"{data['n_cells']:,} cells, {tokens['tokens_per_cell_mean']:.0f} tokens/cell; "
            f"padded tokens: cellfoundry {tokens['cellfoundry_padded_tokens']:,}, baseline "
            f"{tokens['baseline_padded_tokens_batch_longest']:,} (batch-longest)",
            flush=True,
        )
        sides = {
            "cellfoundry": run_side("cellfoundry", data, models["cellfoundry"]["path"], args, work),
            "baseline": run_side("baseline", data, models["baseline"]["path"], args, work),
        }
    data["path"] = f"(temporary) {Path(data['path']).name}"
    for side in ("cellfoundry", "baseline"):
        models[side]["path"] = f"(temporary) {Path(models[side]['path']).name}"
    profile = {}
    if args.profile:
        profile = {
            "top_cumulative": sides["cellfoundry"].pop("profile_top_cumulative"),
            "top_self": sides["cellfoundry"].pop("profile_top_self"),
        }
    load = [s["load_average_1min_before"] for s in sides.values()]
    report = {
        "benchmark": NAME,
        "environment": env,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("_")
        },
        "input": data,
        "models": models,
        "tokens": tokens,
        "labels": {
            "cellfoundry": "cellfoundry `load_model` + `embed` (encoder only, sorted batches)",
            "baseline": (
                "`BertForMaskedLM(output_hidden_states=True)`, unsorted batches, "
                f"{args.baseline_padding} padding"
            ),
        },
        "sides": sides,
        "ratios": {
            "cells_per_s": round(
                sides["cellfoundry"]["cells_per_s"] / sides["baseline"]["cells_per_s"], 3
            ),
            "wall_cells_per_s": round(
                sides["cellfoundry"]["wall_cells_per_s"] / sides["baseline"]["wall_cells_per_s"], 3
            ),
            "cells_per_cpu_second": round(
                sides["cellfoundry"]["cells_per_cpu_second"]
                / sides["baseline"]["cells_per_cpu_second"],
                3,
            ),
            "peak_rss": round(
                sides["cellfoundry"]["peak_rss_bytes"] / sides["baseline"]["peak_rss_bytes"], 3
            ),
        },
        "targets": targets(sides["cellfoundry"], sides["baseline"]),
        "contention_note": (
            "the machine's cores were shared with other jobs (load average above)"
            if max(load) > 0.5
            else "the machine was otherwise idle"
        ),
        "timing_method": (
            "cells/s = cells / work seconds measured inside each child: read_h5ad + model load "
            "+ tokenization + forward passes + pooling (Python start-up and imports excluded); "
            "wall = fork -> wait4 of the child (start-up and imports included)."
        ),
        "peak_rss_method": (
            "ru_maxrss from os.wait4 on each child, started by a small fork/exec launcher so "
            "the parent's RSS does not leak into it (floor: launcher_vmhwm_bytes); the "
            "child's own VmHWM is recorded beside it"
        ),
        "notes": [],
        "profile": profile,
    }
    report["notes"] = [
        "Both models are random-initialised (what the issue specifies: throughput does not "
        "depend on trained weights); embeddings are not compared.",
        "Baseline batching follows helical's Geneformer `get_embs` (helicalAI/helical, "
        "helical/models/geneformer/geneformer_utils.py): cells in input order, each batch "
        "padded to its longest cell, `BertForMaskedLM` loaded with `output_hidden_states=True` "
        "so every forward computes (batch, length, vocab) logits and keeps all hidden states; "
        "mean over the gene tokens (its `cell` mode, <cls> excluded). helical's default batch "
        "is 24. Tokens are cellfoundry's (same tokenizer), so only the embedding path differs.",
        f"Attention kernel: cellfoundry {sides['cellfoundry']['attn_implementation']}, "
        f"baseline {sides['baseline']['attn_implementation']} (transformers' default).",
        "Peak RSS includes torch, transformers and anndata (RSS after imports: cellfoundry "
        f"{sides['cellfoundry']['rss_after_imports_bytes'] / MIB:,.0f} MiB, baseline "
        f"{sides['baseline']['rss_after_imports_bytes'] / MIB:,.0f} MiB), so no embedding path "
        "can go below that floor.",
        "CPU contention: each side ran once, one after the other, beside other jobs; "
        "cells/CPU-s is less sensitive to that than cells/s. Rerun on an idle machine for "
        "figures to quote.",
    ]
    json_path = args.out / f"{args.name}.json"
    text = markdown(report)
    write_report(json_path, report, text)
    print(text)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
