"""Tokenizer throughput: end-to-end ``cellfoundry tokenize`` vs a plain per-cell reference.

What one run does (see ``benchmarks/README.md``):

1. Builds (or reuses from ``benchmarks/_work``) a count ``.h5ad`` of ``--n-cells`` cells by tiling
   real cells of one gene space (Kang 2018 PBMC, all 14,053 genes): source cells are drawn with
   a seeded RNG and thinned with ``rng.binomial(counts, p)``, ``p ~ U[0.5, 1.0]`` per cell, so no
   two cells are copies. CSR float32, uncompressed, written chunk by chunk.
2. Times the CLI in a subprocess (``--backend numba`` and ``--backend numpy``): wall time from
   launch to exit (start-up and imports included) and the CLI's own printed cells/s; peak RSS
   of the child from ``os.wait4`` (``ru_maxrss`` of that child alone).
3. Times ``tokenize_matrix_reference`` in-process on a seeded subset of cells (file reading
   excluded), and checks the CLI's tokens equal the reference on 100% of that subset.
4. Runs the CLI (numba) on a ``--scale-cells`` file for peak RSS at larger size.
5. Prints a table; writes ``benchmarks/results/tokenizer_throughput.{json,md}``.

``--profile`` adds a cProfile of an in-process ``tokenize_files`` call on the ``--n-cells`` file.
Timings are measurements of this machine at this moment, never assertions.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
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
GIB = 1024**3
BUILD_CHUNK = 10_000  # cells per build chunk (fixed: it is part of what the seed reproduces)
P_RANGE = (0.5, 1.0)

PEER_HELICAL_CELLS_PER_S = 3_020  # helical 2.2.0, measured by another session on this kind
TARGET_CELLS_PER_S = 10_000
STRETCH_CELLS_PER_S = 30_000
TARGET_PEAK_RSS_BYTES = 1 * GIB
UNCHANGED_TOLERANCE = 1.10  # "unchanged": peak RSS at scale <= 1.10 x peak RSS at n_cells


# -- input file -----------------------------------------------------------------------------


def build_counts_file(n_cells: int, seed: int, source: Path = SOURCE) -> dict:
    """Write (or reuse) the tiled, thinned count file; returns its description (path, sha256)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"tiled_kang2018_{n_cells}cells_seed{seed}.h5ad"
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists():
        info = json.loads(sidecar.read_text())
        if info.get("size_bytes") == path.stat().st_size:
            info["reused_cached_file"] = True
            print(f"reusing {path.name} ({info['size_bytes'] / GIB:.2f} GiB)", flush=True)
            return info

    start = time.perf_counter()
    print(f"building {path.name} ...", flush=True)
    src = ad.read_h5ad(source)
    matrix = sp.csr_matrix(src.X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    source_rows = np.empty(n_cells, dtype=np.int64)
    thin_p = np.empty(n_cells, dtype=np.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    # Skeleton through anndata (obs, var, encodings); X is then replaced by a streamed CSR.
    obs = pd.DataFrame(index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]))
    skeleton = ad.AnnData(
        X=sp.csr_matrix((n_cells, src.n_vars), dtype=np.float32), obs=obs, var=src.var.copy()
    )
    skeleton.uns["benchmark_source"] = source.name
    skeleton.write_h5ad(tmp)
    del skeleton
    nnz = 0
    with h5py.File(tmp, "r+") as f:
        del f["X"]
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, src.n_vars], dtype=np.int64)
        data = group.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 18,))
        indices = group.create_dataset(
            "indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 18,)
        )
        indptr = group.create_dataset("indptr", (n_cells + 1,), np.int64)
        indptr[0] = 0
        for lo in range(0, n_cells, BUILD_CHUNK):
            hi = min(lo + BUILD_CHUNK, n_cells)
            rows = rng.integers(0, matrix.shape[0], hi - lo)
            p = rng.uniform(*P_RANGE, hi - lo)
            block = matrix[rows]
            per_entry = np.repeat(p, np.diff(block.indptr))
            block.data = rng.binomial(block.data.astype(np.int64), per_entry).astype(np.float32)
            block.eliminate_zeros()
            block.sort_indices()
            source_rows[lo:hi], thin_p[lo:hi] = rows, p
            new = nnz + block.nnz
            data.resize((new,))
            indices.resize((new,))
            data[nnz:new] = block.data
            indices[nnz:new] = block.indices
            indptr[lo + 1 : hi + 1] = block.indptr[1:].astype(np.int64) + nnz
            nnz = new
        write_elem(f, "obs", pd.DataFrame({"source_row": source_rows, "thin_p": thin_p}, obs.index))
    tmp.replace(path)
    info = {
        "path": str(path.relative_to(ROOT)),
        "n_cells": n_cells,
        "n_genes": int(src.n_vars),
        "nnz": int(nnz),
        "mean_nnz_per_cell": round(nnz / n_cells, 1),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "source": source.name,
        "source_sha256": sha256_file(source),
        "seed": seed,
        "thinning": f"rng.binomial(counts, p), p ~ U{list(P_RANGE)} per cell",
        "build_chunk_cells": BUILD_CHUNK,
        "storage": "CSR float32 (indices int32, indptr int64), uncompressed",
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    info["reused_cached_file"] = False
    print(f"  built in {info['build_seconds']} s ({info['size_bytes'] / GIB:.2f} GiB)", flush=True)
    return info


# -- end-to-end CLI -------------------------------------------------------------------------
TOTAL_LINE = re.compile(
    r"total: (\d+) cells, (\d+) tokens/cell, ([\d.]+) s, ([\d,]+) cells/s", re.MULTILINE
)


def run_cli(path: Path, out_dir: Path, backend: str, tokenizer: str, label: str) -> dict:
    """Run ``cellfoundry tokenize`` in a child; wall time, printed summary, peak RSS (wait4)."""
    exe = Path(sys.executable).parent / "cellfoundry"
    cmd = [str(exe), "tokenize", str(path), str(out_dir), "--tokenizer", tokenizer]
    cmd += ["--backend", backend, "--no-progress", "--overwrite"]
    log = WORK / f"cli_{label}.log"
    load_before = os.getloadavg()[0]
    usage = run_measured(cmd, log, " ".join(cmd))
    text = log.read_text(errors="replace")
    wall = usage["wall"]
    match = TOTAL_LINE.search(text)
    if match is None:
        raise RuntimeError(f"no 'total:' line in the CLI output:\n{text[-3000:]}")
    cells_out, tokens_per_cell, cli_seconds, cli_rate = match.groups()
    n_in = _cells_in(path)
    cpu = usage["utime"] + usage["stime"]
    result = {
        "label": label,
        "command": " ".join([Path(cmd[0]).name, *cmd[1:]]),
        "backend": backend,
        "n_cells_in": n_in,
        "n_cells_out": int(cells_out),
        "tokens_per_cell": int(tokens_per_cell),
        "wall_seconds": round(wall, 3),
        "wall_cells_per_s": round(n_in / wall, 1),
        "cli_seconds": float(cli_seconds),
        "cli_cells_per_s": float(cli_rate.replace(",", "")),
        "startup_and_load_seconds": round(wall - float(cli_seconds), 3),
        "peak_rss_bytes": int(usage["maxrss_kib"]) * 1024,  # Linux: KiB
        "launcher_vmhwm_bytes": int(usage["launcher_vmhwm_kib"]) * 1024,
        "user_cpu_seconds": round(usage["utime"], 2),
        "system_cpu_seconds": round(usage["stime"], 2),
        "cells_per_cpu_second": round(n_in / max(cpu, 1e-9), 1),
        "load_average_1min_before": round(load_before, 2),
    }
    print(
        f"  {label}: wall {wall:.2f} s ({result['wall_cells_per_s']:,.0f} cells/s), CLI "
        f"{result['cli_cells_per_s']:,.0f} cells/s, peak RSS "
        f"{result['peak_rss_bytes'] / 2**20:,.0f} MiB, cpu {cpu:.1f} s, load {load_before:.2f}",
        flush=True,
    )
    return result


def summarize_runs(runs: list[dict]) -> dict:
    """Median (used for the targets) and best of repeated runs; peak RSS is the max over runs."""
    walls = [r["wall_cells_per_s"] for r in runs]
    clis = [r["cli_cells_per_s"] for r in runs]
    first = runs[0]
    return {
        "backend": first["backend"],
        "n_cells_in": first["n_cells_in"],
        "n_cells_out": first["n_cells_out"],
        "tokens_per_cell": first["tokens_per_cell"],
        "repeats": len(runs),
        "wall_seconds": round(float(np.median([r["wall_seconds"] for r in runs])), 3),
        "wall_cells_per_s": round(float(np.median(walls)), 1),
        "wall_cells_per_s_best": max(walls),
        "cli_cells_per_s": round(float(np.median(clis)), 1),
        "cli_cells_per_s_best": max(clis),
        "startup_and_load_seconds": round(
            float(np.median([r["startup_and_load_seconds"] for r in runs])), 3
        ),
        "cells_per_cpu_second": round(
            float(np.median([r["cells_per_cpu_second"] for r in runs])), 1
        ),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "peak_rss_bytes_median": int(np.median([r["peak_rss_bytes"] for r in runs])),
        "runs": runs,
    }


def _cells_in(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].attrs["shape"][0])


# -- reference + parity ---------------------------------------------------------------------
def read_subset(path: Path, rows: np.ndarray):
    """Rows of the file as CSR float32, their float64 totals over all genes, cell ids, var."""
    import h5py
    import scipy.sparse as sp
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        x = f["X"]
        n_genes = int(x.attrs["shape"][1])
        indptr = x["indptr"][:]
        datas, indexes, lengths = [], [], []
        for row in rows:
            lo, hi = int(indptr[row]), int(indptr[row + 1])
            datas.append(x["data"][lo:hi])
            indexes.append(x["indices"][lo:hi])
            lengths.append(hi - lo)
        var = read_elem(f["var"])
        obs_index = read_elem(f["obs"]).index
    sub_indptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    matrix = sp.csr_matrix(
        (np.concatenate(datas).astype(np.float32), np.concatenate(indexes), sub_indptr),
        shape=(rows.size, n_genes),
    )
    n_counts = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    return matrix, n_counts, np.asarray(obs_index[rows]).astype(str), var


def check_parity(out_dir: Path, cell_ids: np.ndarray, reference: list[np.ndarray]) -> dict:
    """Compare the CLI's tokens with the reference for every subset cell (by cell id)."""
    import datasets

    ds = datasets.load_from_disk(str(out_dir))
    position = {cid: i for i, cid in enumerate(ds["cell_id"])}
    present = [position.get(cid) for cid in cell_ids]
    found = [i for i in present if i is not None]
    cli_tokens = iter(ds.select(found)["input_ids"]) if found else iter(())
    equal, mismatches = 0, []
    for cid, pos, ref in zip(cell_ids, present, reference, strict=True):
        if pos is None:  # dropped by the CLI: only right for a cell with no vocabulary gene
            ok = ref.size <= 1
        else:
            ok = np.array_equal(np.asarray(next(cli_tokens), dtype=np.int32), ref)
        equal += ok
        if not ok and len(mismatches) < 5:
            mismatches.append(str(cid))
    return {
        "n_cells_checked": len(cell_ids),
        "n_equal": int(equal),
        "fraction_equal": equal / max(len(cell_ids), 1),
        "n_dropped_by_cli": sum(p is None for p in present),
        "output_rows": ds.num_rows,
        "first_mismatches": mismatches,
        "all_equal": equal == len(cell_ids),
    }


# -- profile --------------------------------------------------------------------------------
PROFILE_GROUPS = {
    # label -> regex over "file:line(function)"; cumulative seconds (groups may nest)
    "open file, list var and obs (CountReader.__init__)": r"anndata_io\.py:\d+\(__init__\)",
    "gene resolution (resolve_genes)": r"genes\.py:\d+\(resolve_genes\)",
    "read h5py rows (CountReader._read_rows)": r"anndata_io\.py:\d+\(_read_rows\)",
    "validate counts (CountReader._validate)": r"anndata_io\.py:\d+\(_validate\)",
    "rank (RankValueTokenizer.rank, incl. numba load)": r"rank_value\.py:\d+\(rank\)",
    "  numba kernels: load from on-disk cache": r"dispatcher\.py:\d+\(_compile_for_args\)",
    "  numba gather kernel": r"_rank_kernels\.py:\d+\(gather\)",
    "  per-row np.argsort in a thread pool (main thread waiting)": r"\(result_iterator\)",
    "  numba finish kernel": r"_rank_kernels\.py:\d+\(finish\)",
    "Arrow record batch (_record_batch)": r"pipeline\.py:\d+\(_record_batch\)",
    # pyarrow's write_batch is a Cython call cProfile does not see: it lands in the self time
    # of tokenize_to_arrow (the "self:" prefix selects self time instead of cumulative)
    "self: tokenize_to_arrow (incl. Arrow write_batch)": r"pipeline\.py:\d+\(tokenize_to_arrow\)",
    "imports triggered inside tokenize_files": r"\(_find_and_load\)",
    "finalize_dataset (imports datasets)": r"pipeline\.py:\d+\(finalize_dataset\)",
}


def _profile_child(path: Path, tokenizer_name: str, backend: str, out_json: Path) -> None:
    """Run in a fresh interpreter, as the CLI would: time imports, load, then cProfile the work."""
    t0 = time.perf_counter()
    import cellfoundry.cli  # noqa: F401  (what the CLI imports before working)
    from cellfoundry.tokenization import TokenizeOptions, load_tokenizer, tokenize_files

    t1 = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_name)
    t2 = time.perf_counter()
    profiler = cProfile.Profile()
    profiler.enable()
    reports = tokenize_files(
        [path], WORK / "out_profile", tokenizer, TokenizeOptions(backend=backend), overwrite=True
    )
    profiler.disable()
    t3 = time.perf_counter()
    profiler.dump_stats(str(WORK / "profile_tokenize_files.prof"))
    stats = pstats.Stats(profiler)
    groups = {}
    for label, pattern in PROFILE_GROUPS.items():
        regex = re.compile(pattern)
        column = 2 if label.startswith("self:") else 3  # pstats: tottime, cumtime
        groups[label] = round(
            sum(
                value[column]
                for (file, line, func), value in stats.stats.items()
                if regex.search(f"{file}:{line}({func})")
            ),
            3,
        )
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    top = WORK / "profile_tokenize_files.txt"
    top.write_text(text.getvalue())
    result = {
        "backend": backend,
        "n_cells": reports[0].n_cells_in,
        "import_seconds": round(t1 - t0, 3),
        "load_tokenizer_seconds": round(t2 - t1, 3),
        "tokenize_files_seconds_under_cprofile": round(t3 - t2, 3),
        "cumulative_seconds": groups,
        "note": "fresh interpreter; cProfile adds overhead; groups are cumulative and may nest",
        "top_functions_file": str(top.relative_to(ROOT)),
    }
    out_json.write_text(json.dumps(result, indent=2) + "\n")


def profile_tokenize(path: Path, tokenizer_name: str, backend: str) -> dict:
    """cProfile an in-process ``tokenize_files`` call in a fresh child interpreter."""
    out_json = WORK / "profile_tokenize_files.json"
    cmd = [sys.executable, __file__, "--_profile-child", str(path)]
    cmd += ["--tokenizer", tokenizer_name, "--_backend", backend]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out_json.read_text())
    result["child_wall_seconds"] = round(time.perf_counter() - start, 3)
    return result


# -- environment ----------------------------------------------------------------------------
def environment() -> dict:
    import numba

    return {
        "command": command_line(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
        "numba_threads_default": numba.config.NUMBA_NUM_THREADS,
        "versions": {
            name: package_version(name)
            for name in (
                "cellfoundry",
                "numpy",
                "numba",
                "scipy",
                "anndata",
                "datasets",
                "pyarrow",
                "h5py",
                "pandas",
            )
        },
        **git_state(ROOT),
        "source_sha256": {  # the code measured, as it was on disk at the start of this run
            str(p.relative_to(ROOT)): sha256_file(p)[:16]
            for p in sorted((ROOT / "src" / "cellfoundry" / "tokenization").glob("*.py"))
        },
        "device": "CPU only",
        "dtype": "float32 counts, float64 medians/values",
    }


# -- targets, table -------------------------------------------------------------------------
def targets(results: dict) -> list[dict]:
    cli = results["end_to_end"]
    numba_wall = cli["numba"]["wall_cells_per_s"]
    rows = [
        {
            "target": "end-to-end cells/s, numba, wall from launch to exit (1 process)",
            "threshold": f">= {TARGET_CELLS_PER_S:,}",
            "measured": numba_wall,
            "meets_target": numba_wall >= TARGET_CELLS_PER_S,
            "unit": "cells/s",
        },
        {
            "target": "end-to-end cells/s, numba, CLI-reported (excl. start-up/imports)",
            "threshold": f">= {TARGET_CELLS_PER_S:,}",
            "measured": cli["numba"]["cli_cells_per_s"],
            "meets_target": cli["numba"]["cli_cells_per_s"] >= TARGET_CELLS_PER_S,
            "unit": "cells/s",
        },
        {
            "target": "end-to-end cells/s, numpy fallback, wall from launch to exit",
            "threshold": f">= {TARGET_CELLS_PER_S:,}",
            "measured": cli["numpy"]["wall_cells_per_s"],
            "meets_target": cli["numpy"]["wall_cells_per_s"] >= TARGET_CELLS_PER_S,
            "unit": "cells/s",
        },
        {
            "target": "stretch: end-to-end cells/s, numba, wall",
            "threshold": f">= {STRETCH_CELLS_PER_S:,}",
            "measured": numba_wall,
            "meets_target": numba_wall >= STRETCH_CELLS_PER_S,
            "unit": "cells/s",
        },
        {
            "target": (
                f"speed-up over helical 2.2.0 ({PEER_HELICAL_CELLS_PER_S:,} cells/s: "
                "peer figure, not measured in this run), numba wall"
            ),
            "threshold": ">= 3.0x",
            "measured": round(numba_wall / PEER_HELICAL_CELLS_PER_S, 2),
            "meets_target": numba_wall / PEER_HELICAL_CELLS_PER_S >= 3.0,
            "unit": "x",
        },
    ]
    for backend in ("numba", "numpy"):
        rss = cli[backend]["peak_rss_bytes"]
        rows.append(
            {
                "target": f"peak RSS at {cli[backend]['n_cells_in']:,} cells, {backend}",
                "threshold": "<= 1 GiB",
                "measured": rss,
                "meets_target": rss <= TARGET_PEAK_RSS_BYTES,
                "unit": "bytes",
            }
        )
    scale = results.get("scale")
    if scale is not None:
        # <= 1 GiB uses the max over repeats; "unchanged" compares with their median
        rss_small = cli["numba"]["peak_rss_bytes_median"]
        rss_big = scale["peak_rss_bytes"]
        rows.append(
            {
                "target": f"peak RSS at {scale['n_cells_in']:,} cells, numba",
                "threshold": "<= 1 GiB",
                "measured": rss_big,
                "meets_target": rss_big <= TARGET_PEAK_RSS_BYTES,
                "unit": "bytes",
            }
        )
        rows.append(
            {
                "target": (
                    f"peak RSS unchanged {cli['numba']['n_cells_in']:,} -> "
                    f"{scale['n_cells_in']:,} cells (ratio to the median at "
                    f"{cli['numba']['n_cells_in']:,})"
                ),
                "threshold": f"<= {UNCHANGED_TOLERANCE:.2f}",
                "measured": round(rss_big / rss_small, 3),
                "meets_target": rss_big <= UNCHANGED_TOLERANCE * rss_small,
                "unit": "ratio",
            }
        )
    parity = results["parity"]
    rows.append(
        {
            "target": "tokens equal the reference (numba and numpy outputs), subset cells",
            "threshold": "100%",
            "measured": min(p["fraction_equal"] for p in parity.values()),
            "meets_target": all(p["all_equal"] for p in parity.values()),
            "unit": "fraction",
        }
    )
    return rows


def _fmt(value, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:,.0f} MiB"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "fraction":
        return f"{100 * value:.2f}%"
    return f"{value:,.0f}"


def tables(results: dict) -> str:
    cli, ref = results["end_to_end"], results["reference"]
    lines = [
        "| path | cells | runs | wall s | cells/s (wall) | cells/s (CLI) | cells/CPU-s "
        "| peak RSS | wall ratio vs reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = [cli["numba"], cli["numpy"]] + ([results["scale"]] if results.get("scale") else [])
    for run in runs:
        lines.append(
            f"| CLI `--backend {run['backend']}` | {run['n_cells_in']:,} | "
            f"{run.get('repeats', 1)} | {run['wall_seconds']:.2f} | "
            f"{run['wall_cells_per_s']:,.0f} | {run['cli_cells_per_s']:,.0f} | "
            f"{run['cells_per_cpu_second']:,.0f} | {run['peak_rss_bytes'] / 2**20:,.0f} MiB | "
            f"{run['wall_cells_per_s'] / ref['cells_per_s']:.1f}x |"
        )
    lines.append(
        f"| reference `tokenize_matrix_reference` (in-process, no I/O) | {ref['n_cells']:,} | 1 | "
        f"{ref['seconds']:.2f} | {ref['cells_per_s']:,.0f} | - | - | - | 1.0x |"
    )
    lines += ["", "| target | threshold | measured | meets |", "|---|---|---:|:---:|"]
    for row in results["targets"]:
        lines.append(
            f"| {row['target']} | {row['threshold']} | {_fmt(row['measured'], row['unit'])} | "
            f"{'yes' if row['meets_target'] else 'no'} |"
        )
    profile = results.get("profile")
    if profile:
        lines += [
            "",
            f"cProfile of in-process `tokenize_files` ({profile['backend']}, "
            f"{profile['n_cells']:,} cells, fresh interpreter; imports before the call "
            f"{profile['import_seconds']:.2f} s, tokenizer load "
            f"{profile['load_tokenizer_seconds']:.2f} s):",
            "",
            "| part (cumulative, nested parts indented) | seconds |",
            "|---|---:|",
            f"| tokenize_files total (under cProfile) | "
            f"{profile['tokenize_files_seconds_under_cprofile']:.2f} |",
        ]
        for label, seconds in profile["cumulative_seconds"].items():
            label = label.replace("  ", "&nbsp;&nbsp;", 1) if label.startswith("  ") else label
            lines.append(f"| {label} | {seconds:.2f} |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--scale-cells", type=int, default=300_000)
    parser.add_argument("--no-scale", action="store_true", help="skip the scale (RSS) run")
    parser.add_argument("--reference-cells", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="CLI runs per backend at n-cells")
    parser.add_argument("--tokenizer", default="cf-human-v1")
    parser.add_argument("--out", type=Path, default=RESULTS / "tokenizer_throughput.json")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    parser.add_argument("--profile", action="store_true", help="cProfile in-process tokenize")
    parser.add_argument("--keep-outputs", action="store_true", help="keep tokenized folders")
    parser.add_argument("--_profile-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_backend", default="numba", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._profile_child is not None:
        _profile_child(
            args._profile_child, args.tokenizer, args._backend, WORK / "profile_tokenize_files.json"
        )
        return 0

    from cellfoundry.genes import resolve_genes
    from cellfoundry.tokenization import load_tokenizer
    from cellfoundry.tokenization.reference import tokenize_matrix_reference

    started = time.perf_counter()
    results: dict = {"benchmark": "tokenizer_throughput", "environment": environment()}
    results["arguments"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    tokenizer = load_tokenizer(args.tokenizer)
    results["tokenizer"] = {
        "id": tokenizer.name,
        "vocab_sha256": tokenizer.vocab.sha256,
        "max_length": tokenizer.max_length,
    }

    data = build_counts_file(args.n_cells, args.seed)
    results["input"] = data
    path = ROOT / data["path"]

    warm = None
    if not args.no_warmup:  # numba's on-disk cache and the page cache: not part of the timing
        warm_data = build_counts_file(5_000, args.seed)
        print("warm-up (untimed for the results):", flush=True)
        warm = run_cli(
            ROOT / warm_data["path"], WORK / "out_warmup", "numba", args.tokenizer, "warmup"
        )
    results["warmup"] = warm

    print(f"end-to-end CLI on {args.n_cells:,} cells:", flush=True)
    outs = {b: WORK / f"out_{b}_{args.n_cells}" for b in ("numba", "numpy")}
    results["end_to_end"] = {}
    for backend, out in outs.items():
        runs = [
            run_cli(path, out, backend, args.tokenizer, f"{backend}_{args.n_cells}_r{i}")
            for i in range(args.repeats)
        ]
        results["end_to_end"][backend] = summarize_runs(runs)
    results["timing_method"] = (
        "wall: fork -> wait4 of the CLI child (python start-up, imports, tokenizer load, "
        "tokenizing, dataset finalised); CLI: the cells/s the CLI prints (its own timer around "
        "tokenize_files). Figures are medians over --repeats; the input file is in the page "
        "cache (just written or read). The machine's 2 cores are shared with other sessions: "
        "see load_average_1min_before per run."
    )
    results["peak_rss_method"] = (
        "ru_maxrss from os.wait4 on the CLI child, started by a small fork/exec launcher so the "
        "benchmark's own RSS does not leak into it (floor: launcher_vmhwm_bytes)"
    )

    rng = np.random.default_rng(args.seed + 1)
    n_ref = min(args.reference_cells, args.n_cells)
    rows = np.sort(rng.choice(args.n_cells, n_ref, replace=False))
    matrix, n_counts, cell_ids, var = read_subset(path, rows)
    column_tokens = tokenizer.column_tokens(resolve_genes(var).ensembl_ids)
    print(f"reference on {n_ref:,} cells ...", flush=True)
    start = time.perf_counter()
    reference = tokenize_matrix_reference(
        matrix,
        n_counts,
        column_tokens,
        tokenizer.medians,
        tokenizer.max_length,
        tokenizer.vocab.cls_id,
    )
    ref_seconds = time.perf_counter() - start
    results["reference"] = {
        "function": "cellfoundry.tokenization.reference.tokenize_matrix_reference",
        "n_cells": n_ref,
        "subset_seed": args.seed + 1,
        "subset": "rng.choice(n_cells, reference_cells, replace=False), sorted",
        "seconds": round(ref_seconds, 3),
        "cells_per_s": round(n_ref / ref_seconds, 1),
        "excludes": "file reading, gene resolution",
    }
    print(f"  reference: {n_ref / ref_seconds:,.0f} cells/s", flush=True)
    for backend, run in results["end_to_end"].items():
        run["ratio_wall_vs_reference"] = round(run["wall_cells_per_s"] / (n_ref / ref_seconds), 2)
        run["ratio_cli_vs_reference"] = round(run["cli_cells_per_s"] / (n_ref / ref_seconds), 2)
        results["end_to_end"][backend] = run

    results["parity"] = {b: check_parity(outs[b], cell_ids, reference) for b in outs}
    for backend, parity in results["parity"].items():
        print(
            f"parity {backend}: {parity['n_equal']}/{parity['n_cells_checked']} subset cells "
            f"equal the reference ({100 * parity['fraction_equal']:.2f}%)",
            flush=True,
        )

    results["scale"] = None
    if not args.no_scale:
        big = build_counts_file(args.scale_cells, args.seed)
        results["scale_input"] = big
        print(f"scale run on {args.scale_cells:,} cells:", flush=True)
        out_big = WORK / f"out_numba_{args.scale_cells}"
        results["scale"] = run_cli(
            ROOT / big["path"], out_big, "numba", args.tokenizer, f"numba_{args.scale_cells}"
        )
        if not args.keep_outputs:
            shutil.rmtree(out_big, ignore_errors=True)

    if args.profile:
        print("profiling in-process tokenize_files (numba) ...", flush=True)
        results["profile"] = profile_tokenize(path, args.tokenizer, "numba")

    if not args.keep_outputs:
        for out in [*outs.values(), WORK / "out_warmup", WORK / "out_profile"]:
            shutil.rmtree(out, ignore_errors=True)

    results["targets"] = targets(results)
    results["peer_figures"] = {
        "helical 2.2.0 cells/s": PEER_HELICAL_CELLS_PER_S,
        "note": "peer figure, not measured in this run (another session, same machine kind)",
    }
    now = {
        str(p.relative_to(ROOT)): sha256_file(p)[:16]
        for p in sorted((ROOT / "src" / "cellfoundry" / "tokenization").glob("*.py"))
    }
    results["environment"]["source_changed_during_run"] = (
        now != results["environment"]["source_sha256"]
    )
    results["total_benchmark_seconds"] = round(time.perf_counter() - started, 1)
    table = tables(results)
    print()
    print(table)
    md = args.out.with_suffix(".md")
    env = results["environment"]
    header = (
        f"# Tokenizer throughput\n\n`python benchmarks/tokenizer_throughput.py"
        f"{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}` on "
        f"{env['date_utc']}: {env['cpu_count']} CPUs ({env['cpu_model']}), load average "
        f"{env['load_average_at_start']}, input {data['n_cells']:,} tiled Kang 2018 cells "
        f"(seed {args.seed}, sha256 {data['sha256'][:12]}...). Helical's 3,020 cells/s is a "
        "peer figure, not measured in this run. Full record: `tokenizer_throughput.json`.\n\n"
    )
    write_report(args.out, results, header + table + "\n")
    print(f"\nwrote {args.out} and {md}")
    if not all(p["all_equal"] for p in results["parity"].values()):
        print("PARITY FAILED: the CLI's tokens differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
