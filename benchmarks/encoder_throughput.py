"""Encoder throughput: CellBert (eager / sdpa / flash_attention_2) vs CellMamba.

Measures tokens/s and peak memory for a forward pass and for forward+backward (the
masked-gene loss, no optimizer step) at matched non-embedding parameter counts, over input
lengths L. Every speed is reported beside the eager baseline measured in the same process.

    python benchmarks/encoder_throughput.py                     # full grid, CPU, 1 thread
    python benchmarks/encoder_throughput.py --quick             # 10M, L <= 1024
    python benchmarks/encoder_throughput.py --lengths 256 1024 --sizes 40M --repeats 5

Writes ``benchmarks/results/encoder_throughput_<device>.json`` (environment, configs, every
timing, ratios, crossover, and what was not measured and why) and a Markdown table beside it.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the pre-step allocation; on CPU the
peak resident set size above the pre-step baseline, sampled every 2 ms during the warm-up
step (see :class:`GlibcAllocator` for why the allocator is switched around it). Timing: the
median of ``--repeats`` steps after that warm-up, the backends taking turns step by step
(see :func:`interleaved_seconds`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from cellfoundry._benchmarking import command_line, cpu_model, package_version, write_report
from cellfoundry.models import (
    CellBertConfig,
    CellBertForMaskedGeneModeling,
    CellMambaConfig,
    CellMambaForMaskedGeneModeling,
)

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (256, 512, 1024, 2048, 4096)
# Same width for both families; CellMamba's depth is chosen to match CellBert's
# non-embedding parameter count (a Mamba block has about half a Transformer block's weights).
SIZES = {
    "10M": {"hidden": 256, "heads": 4, "bert_layers": 12, "head_dim": 64},
    "40M": {"hidden": 512, "heads": 8, "bert_layers": 12, "head_dim": 64},
    "tiny": {"hidden": 32, "heads": 4, "bert_layers": 2, "head_dim": 16},  # smoke tests only
}
MASK_FRACTION = 0.15
SEED = 0


class GlibcAllocator:
    """Switch glibc malloc between an RSS-faithful mode (memory pass) and its fast mode (timing).

    glibc keeps freed blocks below its mmap threshold on the heap, so RSS does not fall
    between steps and a later step's peak hides in memory already counted in the baseline.
    The memory pass therefore maps every block >= 256 KiB with mmap (returned to the OS on
    free) after trimming the heap; the timing pass uses 32 MiB, the largest value glibc's own
    dynamic threshold reaches, so timed steps reuse heap memory as in ordinary training.
    Outside glibc both are no-ops.
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self) -> None:
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt  # noqa: B018 - probe: not glibc without it
        except (OSError, AttributeError):
            self.libc = None

    def _set(self, mmap_threshold: int, trim_threshold: int) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, mmap_threshold)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, trim_threshold)
            self.libc.malloc_trim(0)

    def for_memory(self) -> None:
        self._set(256 * 1024, 256 * 1024)

    def for_speed(self) -> None:
        self._set(32 * 2**20, 64 * 2**20)


ALLOCATOR = GlibcAllocator()


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the embedding tables (they dominate compute, embeddings do not)."""
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def build_models(size: str, vocab: int, max_length: int) -> dict[str, torch.nn.Module]:
    """CellBert and depth-matched CellMamba for a size preset, dropout off."""
    spec = SIZES[size]
    common = {
        "vocab_size": vocab,
        "hidden_size": spec["hidden"],
        "max_position_embeddings": max_length,
        "hidden_dropout_prob": 0.0,
    }
    torch.manual_seed(SEED)
    bert = CellBertForMaskedGeneModeling(
        CellBertConfig(
            **common,
            num_hidden_layers=spec["bert_layers"],
            num_attention_heads=spec["heads"],
            intermediate_size=4 * spec["hidden"],
            attention_probs_dropout_prob=0.0,
        )
    )
    target = non_embedding_parameters(bert)
    one_layer = CellMambaConfig(**common, num_hidden_layers=1, head_dim=spec["head_dim"])
    two_layers = CellMambaConfig(**common, num_hidden_layers=2, head_dim=spec["head_dim"])
    small = non_embedding_parameters(CellMambaForMaskedGeneModeling(one_layer))
    per_layer = non_embedding_parameters(CellMambaForMaskedGeneModeling(two_layers)) - small
    layers = max(1, round((target - (small - per_layer)) / per_layer))
    torch.manual_seed(SEED)
    mamba = CellMambaForMaskedGeneModeling(
        CellMambaConfig(**common, num_hidden_layers=layers, head_dim=spec["head_dim"])
    )
    return {"bert": bert, "mamba": mamba}


def make_batch(
    length: int, batch_size: int, vocab: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Synthetic full-length cells: <cls> + random gene ids, 15 % labelled."""
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(8, vocab, (batch_size, length), generator=generator)
    input_ids[:, 0] = 2
    labels = input_ids.masked_fill(
        torch.rand(input_ids.shape, generator=generator) > MASK_FRACTION, -100
    )
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def run_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str) -> None:
    """One forward (inference mode) or forward+backward (masked-gene loss)."""
    if mode == "forward":
        with torch.inference_mode():
            model(**batch)
        return
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssSampler:
    """Peak resident memory of this process while a block runs (CPU peak memory)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def measure(self, block: Callable[[], None]) -> float:
        """Run ``block``; return peak RSS above the starting RSS, in MiB."""
        baseline = self.process.memory_info().rss
        self.peak, thread = baseline, threading.Thread(target=self._sample, daemon=True)
        self._stop.clear()
        thread.start()
        try:
            block()
        finally:
            self._stop.set()
            thread.join()
        return (max(self.peak, self.process.memory_info().rss) - baseline) / 2**20


def warm_up(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, device: torch.device
) -> float:
    """One untimed step (kernel selection, allocator warm-up) that also measures peak memory."""
    model.train(mode == "train")

    def step() -> None:
        run_step(model, batch, mode)
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ALLOCATOR.for_memory()
    try:
        return RssSampler().measure(step)
    finally:
        ALLOCATOR.for_speed()


def interleaved_seconds(
    models: list[torch.nn.Module],
    batch: dict[str, torch.Tensor],
    mode: str,
    repeats: int,
    device: torch.device,
) -> list[list[float]]:
    """Time ``repeats`` rounds of one step per model, the models taking turns within a round.

    On a shared machine the load drifts over seconds; timing backend A's steps and then
    backend B's would fold that drift into the A/B ratio. Taking turns exposes every backend
    to the same drift, and round r of each backend gives a per-round ratio whose spread shows
    how much of a small difference is noise.
    """
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for index, model in enumerate(models):
            model.train(mode == "train")
            start = time.perf_counter()
            run_step(model, batch, mode)
            synchronize(device)
            times[index].append(time.perf_counter() - start)
    return times


def timing_summary(seconds: list[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_s": median, "tokens_per_s": tokens / median}


def predicted_seconds(
    previous: dict[tuple, float], key: tuple, length: int, backend: str
) -> float | None:
    """Extrapolate a step's time from the same config at the previous measured length."""
    candidates = [(L, t) for (k, L), t in previous.items() if k == key and length > L]
    if not candidates:
        return None
    last_length, last_time = max(candidates)
    exponent = 1.1 if backend == "mamba" else 1.6  # attention tends to L^2 at long L
    return last_time * (length / last_length) ** exponent


def eager_attention_gib(model: torch.nn.Module, length: int, batch_size: int, mode: str) -> float:
    """Memory eager attention materialises: scores + probabilities, per layer in training."""
    config = model.config
    per_layer = batch_size * config.num_attention_heads * length**2 * 4 * 2
    layers = config.num_hidden_layers if mode == "train" else 1
    return per_layer * layers / 2**30


def backends_for(device: torch.device) -> list[str]:
    """eager, sdpa, flash_attention_2 (CUDA with flash-attn installed only), mamba."""
    backends = ["eager", "sdpa"]
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            backends.append("flash_attention_2")
        except ImportError:
            pass
    return [*backends, "mamba"]


def skip_reason(
    args: argparse.Namespace,
    model: torch.nn.Module,
    key: tuple,
    length: int,
    previous: dict[tuple, float],
    deadline: float,
    reserved_s: float = 0.0,
) -> str | None:
    """Why this configuration is not run (memory or time budget), or None to run it.

    ``reserved_s`` is the time already promised to backends warmed up for the same
    (length, mode), whose timed rounds run after every warm-up.
    """
    size, backend, mode = key
    if backend == "eager":
        need = eager_attention_gib(model, length, args.batch_size, mode)
        if need > args.max_attention_gib:
            limit = args.max_attention_gib
            return f"eager attention would hold ~{need:.1f} GiB > --max-attention-gib {limit}"
    remaining = deadline - time.monotonic() - reserved_s
    predicted = predicted_seconds(previous, key, length, backend)
    if predicted is not None and predicted * (args.repeats + 1) > remaining:
        return (
            f"time budget: ~{predicted * (args.repeats + 1):.0f} s predicted, "
            f"{max(remaining, 0):.0f} s of --time-budget-s left"
        )
    if remaining <= 0:
        return "time budget exhausted"
    return None


def backend_models(
    models: dict[str, torch.nn.Module], device: torch.device
) -> dict[str, torch.nn.Module]:
    """One model per backend; the attention backends share CellBert's weights (deep copies),
    so timed steps can take turns without switching ``attn_implementation`` in between."""
    chosen = {}
    for backend in backends_for(device):
        if backend == "mamba":
            chosen[backend] = models["mamba"]
            continue
        model = models["bert"] if backend == "eager" else copy.deepcopy(models["bert"])
        model.set_attn_implementation(backend)
        chosen[backend] = model
    return chosen


def run_grid(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """Measure every (size, length, backend, mode); return results, skips and model info."""
    results, skipped, models_info = [], [], {}
    previous: dict[tuple, float] = {}
    deadline = time.monotonic() + args.time_budget_s
    for size in args.sizes:
        models = build_models(size, args.vocab, max(args.lengths))
        for name, model in models.items():
            model.to(device=device, dtype=dtype)
            models_info[f"{size}/{name}"] = {
                "non_embedding_parameters": non_embedding_parameters(model),
                "total_parameters": sum(p.numel() for p in model.parameters()),
                "config": model.config.to_diff_dict(),
            }
        per_backend = backend_models(models, device)
        for length in sorted(args.lengths):
            batch = make_batch(length, args.batch_size, args.vocab, device)
            digest = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()
            for mode in args.modes:
                ready, reserved_s = [], 0.0
                for backend, model in per_backend.items():
                    key = (size, backend, mode)
                    row = {"size": size, "backend": backend, "mode": mode, "length": length}
                    reason = skip_reason(args, model, key, length, previous, deadline, reserved_s)
                    if reason is None:
                        try:
                            started = time.perf_counter()
                            row["peak_memory_mib"] = warm_up(model, batch, mode, device)
                            reserved_s += (time.perf_counter() - started) * args.repeats
                        except (RuntimeError, MemoryError) as error:  # out of memory
                            reason = f"{type(error).__name__}: {str(error)[:200]}"
                    if reason is not None:
                        skipped.append({**row, "reason": reason})
                        print(f"skip {size:>4} {backend:>17} {mode:>7} L={length:<5} {reason}")
                        continue
                    ready.append((key, model, row))
                seconds = interleaved_seconds(
                    [model for _, model, _ in ready], batch, mode, args.repeats, device
                )
                for (key, _, row), times in zip(ready, seconds, strict=True):
                    row.update(timing_summary(times, batch["input_ids"].numel()))
                    row["input_sha256"] = digest
                    previous[(key, length)] = row["median_s"]
                    results.append(row)
                    print(
                        f"{size:>4} {row['backend']:>17} {mode:>7} L={length:<5} "
                        f"{row['tokens_per_s']:>10.0f} tok/s  {row['peak_memory_mib']:>8.0f} MiB"
                    )
                    sys.stdout.flush()
            del batch
    return results, skipped, models_info


def crossover(
    lengths: list[int], mamba: dict[int, float], attention: dict[int, float]
) -> int | None:
    """Smallest measured L from which Mamba is at least as fast as attention at every L."""
    common = sorted(L for L in lengths if L in mamba and L in attention)
    found = None
    for length in reversed(common):
        if mamba[length] < attention[length]:
            break
        found = length
    return found


def per_round_range(seconds_a: list[float], seconds_b: list[float]) -> list[float]:
    """[min, max] over timing rounds of the speed ratio a/b (= b's time / a's time); the
    backends took turns within each round, so each round's ratio saw the same load."""
    ratios = [tb / ta for ta, tb in zip(seconds_a, seconds_b, strict=True)]
    return [min(ratios), max(ratios)]


def summarize(results: list[dict], sizes: list[str], modes: list[str]) -> dict[str, dict]:
    """Throughput ratios against eager and sdpa, and the attention-vs-Mamba crossover."""
    speed = {(r["size"], r["mode"], r["backend"], r["length"]): r["tokens_per_s"] for r in results}
    seconds = {(r["size"], r["mode"], r["backend"], r["length"]): r["seconds"] for r in results}
    summary = {}
    for size in sizes:
        for mode in modes:
            table = {
                b: {L: s for (sz, m, bk, L), s in speed.items() if (sz, m, bk) == (size, mode, b)}
                for b in ("eager", "sdpa", "flash_attention_2", "mamba")
            }
            lengths = sorted(set().union(*[set(v) for v in table.values()]))
            best_attention = {
                L: max(table[b][L] for b in ("sdpa", "flash_attention_2") if L in table[b])
                for L in lengths
                if L in table["sdpa"] or L in table["flash_attention_2"]
            }
            ratios, spreads = {}, {}
            for L in lengths:
                pairs = [
                    (b, "eager")
                    for b in ("sdpa", "flash_attention_2", "mamba")
                    if L in table[b] and L in table["eager"]
                ]
                if L in table["mamba"] and L in table["sdpa"]:
                    pairs.append(("mamba", "sdpa"))
                ratios[L] = {f"{a}/{b}": table[a][L] / table[b][L] for a, b in pairs}
                spreads[L] = {
                    f"{a}/{b}": per_round_range(
                        seconds[(size, mode, a, L)], seconds[(size, mode, b, L)]
                    )
                    for a, b in pairs
                }
            point = crossover(lengths, table["mamba"], best_attention)
            summary[f"{size}/{mode}"] = {
                "ratios": {str(L): v for L, v in ratios.items()},
                "ratio_per_round_range": {str(L): v for L, v in spreads.items()},
                "crossover_length": point,
                "crossover_note": (
                    f"Mamba >= best attention backend from L={point} on (measured lengths)"
                    if point is not None
                    else f"Mamba slower than attention at the longest measured L "
                    f"({max(best_attention) if best_attention else 'none'}); no crossover measured"
                ),
            }
    return summary


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Versions, hardware, threads and dtype: what a reader needs to compare figures."""
    cpu = cpu_model() or platform.processor()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {
            name: package_version(name)
            for name in ("torch", "transformers", "peft", "cellfoundry", "flash-attn", "mamba-ssm")
        },
        "seed": SEED,
        "command": command_line(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/m" if value is None else format(value, spec)


def _ratio_cell(ratio: float | None, spread: list[float] | None) -> str:
    """``1.03 (0.99-1.06)``: ratio of medians, then its per-round min-max."""
    if ratio is None:
        return "n/m"
    if spread is None:
        return f"{ratio:.2f}"
    return f"{ratio:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"


def _markdown_section(size: str, mode: str, item: dict, report: dict) -> list[str]:
    """One table: tokens/s per backend, ratios, peak memory, for one size and mode."""
    rows = {(r["size"], r["mode"], r["backend"], r["length"]): r for r in report["results"]}
    backends = [
        b
        for b in ("eager", "sdpa", "flash_attention_2", "mamba")
        if any(k[:3] == (size, mode, b) for k in rows)
    ]
    params = {
        b: report["models"][f"{size}/{b}"]["non_embedding_parameters"] / 1e6
        for b in ("bert", "mamba")
    }
    ratio_names = [f"{b}/eager" for b in backends if b != "eager"] + ["mamba/sdpa"]
    title = "forward" if mode == "forward" else "forward+backward"
    lines = [
        f"## {size}, {title} (non-embedding params: CellBert {params['bert']:.1f}M, "
        f"CellMamba {params['mamba']:.1f}M)",
        "",
        "| L | "
        + " | ".join(f"{b} tok/s" for b in backends)
        + " | "
        + " | ".join(ratio_names)
        + " | peak MiB ("
        + " / ".join(backends)
        + ") |",
        "|---" * (2 + len(backends) + len(ratio_names)) + "|",
    ]
    for length, ratio in item["ratios"].items():
        found = [rows.get((size, mode, b, int(length)), {}) for b in backends]
        spread = item.get("ratio_per_round_range", {}).get(length, {})
        cells = [_fmt(r.get("tokens_per_s")) for r in found]
        cells += [_ratio_cell(ratio.get(name), spread.get(name)) for name in ratio_names]
        memory = " / ".join(_fmt(r.get("peak_memory_mib")) for r in found)
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {memory} |")
    return [*lines, "", f"Crossover: {item['crossover_note']}.", ""]


def markdown(report: dict) -> str:
    """A table per size and mode, then the crossover and what was not measured."""
    env, settings = report["environment"], report["settings"]
    lines = [
        "# Encoder throughput",
        "",
        f"Device {env['device_name']} ({env['device']}), {env['dtype']}, "
        f"{env['torch_threads']} thread(s), batch {settings['batch_size']}, median of "
        f"{settings['repeats']} timed steps after 1 warm-up, the backends taking turns step by "
        "step (ratio of medians, then in brackets its min-max over rounds); "
        f"torch {env['versions']['torch']}, "
        f"transformers {env['versions']['transformers']}; machine load average (1 min) "
        f"{env['load_average_1min_start_end'][0]:.1f} at start, "
        f"{env['load_average_1min_start_end'][1]:.1f} at end. Speeds in tokens/s; ratios against "
        "eager (or sdpa) measured in the same run; n/m = not measured (see below).",
        "",
    ]
    for key, item in report["summary"].items():
        lines += _markdown_section(*key.split("/"), item, report)
    lines += ["## Not measured", ""]
    lines += [f"- {entry}" for entry in report["not_measured_summary"]] or ["- nothing"]
    return "\n".join(lines) + "\n"


def not_measured_summary(skipped: list[dict], device: torch.device) -> list[str]:
    """Human-readable list of what the report does not cover, and why."""
    notes = []
    if device.type != "cuda":
        notes.append(
            "GPU (bf16, sdpa, flash_attention_2, mamba_ssm kernel): no CUDA device in this run; "
            "run the script on a GPU machine to fill encoder_throughput_cuda.json"
        )
    notes += [
        f"{s['size']} {s['backend']} {s['mode']} L={s['length']}: {s['reason']}" for s in skipped
    ]
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--sizes", nargs="+", default=["10M", "40M"], choices=list(SIZES))
    parser.add_argument(
        "--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"]
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per config (median)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=25_000, help="gene vocabulary size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--time-budget-s", type=float, default=840.0, help="skip configs past it")
    parser.add_argument(
        "--max-attention-gib", type=float, default=8.0, help="skip bigger eager runs"
    )
    parser.add_argument("--quick", action="store_true", help="10M, L in 256 512 1024, 2 repeats")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.lengths, args.repeats = ["10M"], [256, 512, 1024], 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    load_before = os.getloadavg()
    results, skipped, models_info = run_grid(args, device, dtype)
    report = {
        "benchmark": "encoder_throughput",
        "environment": {
            **environment(device, dtype),
            # Other processes share the machine's cores; this says how busy it was.
            "load_average_1min_start_end": [load_before[0], os.getloadavg()[0]],
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": models_info,
        "results": results,
        "summary": summarize(results, args.sizes, args.modes),
        "not_measured": skipped,
        "not_measured_summary": not_measured_summary(skipped, device),
    }
    output = args.output or RESULTS / f"encoder_throughput_{device.type}.json"
    write_report(output, report, markdown(report))
    print(markdown(report))
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
