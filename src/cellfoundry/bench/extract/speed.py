"""Summary rows of the speed and memory benchmarks (tokenizer, encoder, embedding, in-silico).

Convention for every row here, so that speed rows read like the quality rows beside them:

- ``ours`` is our figure and ``baseline`` the comparator's figure, both in the unit the
  ``metric`` names and both as the benchmark recorded them (a median over repeats where it
  took one). ``best_baseline`` names the comparator: a path measured in the same run, or a
  recorded peer figure, which the ``note`` then says was not measured in this run.
- ``difference`` and ``ci95`` stay ``None``: these benchmarks record figures and ratios, never
  ours minus baseline with an interval, and a ratio is not a difference. The ratio the
  benchmark recorded (e.g. ``4.36x``) is quoted in the ``note`` with its threshold.
- ``verdict`` is ``target met`` / ``target missed`` from the benchmark's own ``meets_target``
  where it recorded a target for that figure, else ``measured`` (nothing is re-judged here).
- Memory is reported in MiB (bytes / 2**20, the only conversion made), lower is better.
- What a benchmark did not measure goes, as text, in the note of the rows it concerns (for the
  encoder: the rows of the same size and mode; items that concern no row, such as "no GPU in
  this run", in the notes of the file's first size and mode), never as a number.
- Notes start with what they are about, because ``SUMMARY.md`` lists each task's distinct
  notes apart from the table.
- ``command`` is the recorded command line, run from the repository root; where none was
  recorded, the script with its recorded arguments.

A file none of whose figures can be read raises ``ValueError`` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from cellfoundry.bench.extract import Extractor, readable
from cellfoundry.bench.rows import SummaryRow, runnable_command

Report = dict[str, Any]

MIB = 2**20


def _number(value: Any) -> float:
    """A recorded figure as a float; anything else (None, text, NaN) is an unreadable file."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, found {value!r}")
    return float(value)


def _verdict(target: dict[str, Any] | None) -> str:
    """The benchmark's own ``meets_target`` as a verdict; ``measured`` without a target."""
    if target is None or not isinstance(target.get("meets_target"), bool):
        return "measured"
    return "target met" if target["meets_target"] else "target missed"


def _find_target(
    targets: Iterable[dict[str, Any]] | None, prefix: str, *words: str
) -> dict[str, Any] | None:
    """The first recorded target whose text starts with ``prefix`` and contains ``words``."""
    for target in targets or ():
        text = str(target.get("target", ""))
        if text.startswith(prefix) and all(word in text for word in words):
            return target
    return None


def _target_note(target: dict[str, Any] | None, measured: str = "") -> str:
    """``<target text>: <measured>, target <threshold>`` (empty without a target)."""
    if target is None:
        return ""
    value = f"{measured}, " if measured else ""
    return f"{target['target']}: {value}target {target['threshold']}"


def _join(*parts: str) -> str:
    """Note sentences, empty ones left out."""
    return "; ".join(p for p in parts if p)


# -- tokenizer_throughput.json ---------------------------------------------------------------
@readable("tokenizer_throughput")
def tokenizer_rows(report: Report, source: str) -> list[SummaryRow]:
    """End-to-end CLI cells/s and peak RSS per backend, the helical peer comparison, the
    300k-cell memory run and parity with the reference tokenizer, each against its target."""
    targets = report.get("targets")
    arguments = dict(report.get("arguments") or {})
    arguments.pop("out", None)  # where it was written: the source file says that
    common = {
        "task": "tokenizer",
        "model": "",
        "source": source,
        "command": runnable_command(
            "tokenizer_throughput", (report.get("environment") or {}).get("command"), arguments
        ),
    }
    name = (report.get("tokenizer") or {}).get("id", "tokenizer")
    rows: list[SummaryRow] = []

    def add(
        setting: str,
        metric: str,
        ours: Any,
        higher: bool,
        target: dict[str, Any] | None,
        measured: str = "",
        note: str = "",
        **extra: Any,
    ) -> None:
        rows.append(
            SummaryRow(
                setting=setting,
                metric=metric,
                higher_is_better=higher,
                ours=_number(ours),
                verdict=_verdict(target),
                note=_join(_target_note(target, measured), note),
                **common,
                **extra,
            )
        )

    peers = report.get("peer_figures") or {}
    helical = next((v for k, v in peers.items() if k.startswith("helical")), None)
    for backend, run in report["end_to_end"].items():
        setting = f"{name}, {run['n_cells_in']:,} cells, {backend} backend"
        runs = f"{run.get('repeats', 1)} CLI runs"
        median = f"median of {runs}"
        wall, cells_per_s = run["wall_cells_per_s"], "end-to-end cells/s"
        target = _find_target(targets, cells_per_s, backend, "wall")
        add(setting, "cells/s, launch to exit", wall, True, target, note=median)
        target = _find_target(targets, cells_per_s, backend, "CLI-reported")
        untargeted = f"{cells_per_s}, {backend}, CLI-reported: no target recorded, {median}"
        note = median if target is not None else untargeted
        add(setting, "cells/s, CLI-reported", run["cli_cells_per_s"], True, target, note=note)
        target = _find_target(targets, "stretch", backend)
        if target is not None:
            add(setting, "cells/s, launch to exit (stretch target)", wall, True, target)
        target = _find_target(targets, "speed-up over helical", backend)
        if target is not None and helical is not None:
            add(
                setting,
                f"cells/s, {backend} vs helical 2.2.0 peer figure",
                wall,
                True,
                target,
                measured=f"{target['measured']}x",
                note=f"helical's {helical:,} cells/s: {peers.get('note', 'peer figure')}",
                best_baseline="helical 2.2.0 (peer figure)",
                baseline=_number(helical),
            )
        target = _find_target(targets, f"peak RSS at {run['n_cells_in']:,} cells, {backend}")
        peak = run["peak_rss_bytes"] / MIB
        add(setting, "peak RSS (MiB)", peak, False, target, note=f"max over {runs}")

    scale = report.get("scale")
    if scale:
        backend, small = scale["backend"], report["end_to_end"][scale["backend"]]
        big, peak = scale["n_cells_in"], scale["peak_rss_bytes"] / MIB
        target = _find_target(targets, f"peak RSS at {big:,} cells")
        add(f"{name}, {big:,} cells, {backend} backend", "peak RSS (MiB)", peak, False, target)
        target = _find_target(targets, "peak RSS unchanged")
        add(
            f"{name}, {backend} backend",
            f"peak RSS (MiB), {big:,} vs {small['n_cells_in']:,} cells",
            peak,
            False,
            target,
            measured=f"ratio {target['measured']}" if target else "",
            best_baseline=f"{small['n_cells_in']:,} cells (median of {small.get('repeats', 1)})",
            baseline=_number(small["peak_rss_bytes_median"]) / MIB,
        )

    parity = report.get("parity")
    if parity:
        checked = sorted({p["n_cells_checked"] for p in parity.values()})
        counts = ", ".join(f"{b} {p['n_equal']}/{p['n_cells_checked']}" for b, p in parity.items())
        add(
            f"{name}, {'/'.join(f'{n:,}' for n in checked)} reference cells, "
            + " and ".join(parity),
            "fraction of cells whose tokens equal the reference",
            min(_number(p["fraction_equal"]) for p in parity.values()),
            True,
            _find_target(targets, "tokens equal the reference"),
            note=f"cells equal: {counts}",
        )
    return rows


# -- encoder_throughput_<device>.json --------------------------------------------------------
_MODE_LABELS = {"forward": "forward", "train": "forward+backward"}


def _encoder_group_notes(report: Report) -> tuple[dict[str, list[str]], list[str]]:
    """Not-measured items per ``size/mode`` group, and those that concern no group."""
    by_group: dict[str, list[str]] = {}
    described = set()
    for item in report.get("not_measured") or []:
        group = f"{item['size']}/{item['mode']}"
        by_group.setdefault(group, []).append(
            f"{item['backend']} L={item['length']} ({item['reason']})"
        )
        described.add(f"{item['size']} {item['backend']} {item['mode']} L={item['length']}:")
    whole_file = [
        line
        for line in report.get("not_measured_summary") or []
        if not any(line.startswith(prefix) for prefix in described)
    ]
    return by_group, whole_file


@readable("encoder_throughput")
def encoder_rows(report: Report, source: str) -> list[SummaryRow]:
    """Tokens/s of each backend pair whose ratio the benchmark recorded (sdpa vs eager, Mamba
    vs eager and vs sdpa, flash-attention vs eager on GPU), per size, mode and length; the
    crossover length where one was found. The benchmark records no target: ``measured``."""
    env, settings = report["environment"], report["settings"]
    speed = {
        (r["size"], r["mode"], r["backend"], int(r["length"])): r["tokens_per_s"]
        for r in report["results"]
    }
    not_measured, whole_file = _encoder_group_notes(report)
    device = f"{env['device']} {env['dtype']}"
    common = {
        "task": "encoder",
        "model": "",
        "source": source,
        "command": runnable_command("encoder_throughput", env.get("command"), settings),
        "verdict": "measured",
    }
    rows: list[SummaryRow] = []
    for group, item in report["summary"].items():
        size, mode = group.split("/")
        label = _MODE_LABELS.get(mode, mode)
        missing = list(not_measured.pop(group, []))
        if not rows:  # the first group carries what concerns no group (e.g. no GPU in this run)
            missing += whole_file
        note = (
            f"Encoder {size} {label} on {env.get('device_name', env['device'])} "
            f"({env['dtype']}, batch {settings['batch_size']}, median of {settings['repeats']} "
            f"steps, backends in turns in one run): {item['crossover_note']}"
        )
        note = _join(note, "not measured: " + "; ".join(missing) if missing else "")
        for length, ratios in sorted(item["ratios"].items(), key=lambda kv: int(kv[0])):
            for pair in ratios:
                ours, base = pair.split("/")
                rows.append(
                    SummaryRow(
                        setting=f"{size}, {label}, L={length}, {device}",
                        metric=f"tokens/s, {ours} vs {base}",
                        higher_is_better=True,
                        ours=_number(speed[(size, mode, ours, int(length))]),
                        best_baseline=base,
                        baseline=_number(speed[(size, mode, base, int(length))]),
                        note=note,
                        **common,
                    )
                )
        if item.get("crossover_length") is not None:
            rows.append(
                SummaryRow(
                    setting=f"{size}, {label}, {device}",
                    metric="crossover length: Mamba >= best attention from L (tokens)",
                    higher_is_better=False,
                    ours=_number(item["crossover_length"]),
                    note=note,
                    **common,
                )
            )
    return rows


# -- embedding_throughput.json ---------------------------------------------------------------
_EMBEDDING_METRICS = (  # side field, metric, higher is better, its target's text, ratio key
    ("cells_per_s", "cells/s (read + load + tokenize + forward)", True, ("cells/s", "(read"), None),
    ("wall_cells_per_s", "cells/s, launch to exit", True, ("cells/s", "(launch-to-exit"), None),
    ("cells_per_cpu_second", "cells per CPU-second", True, None, "cells_per_cpu_second"),
    ("peak_rss_bytes", "peak RSS (MiB)", False, ("peak RSS",), None),
)


@readable("embedding_throughput")
def embedding_rows(report: Report, source: str) -> list[SummaryRow]:
    """cellfoundry's ``embed`` against the helical-style ``BertForMaskedLM`` path on the same
    cells in one run: cells/s (work and wall), cells per CPU-second and peak RSS."""
    settings, sides = report["settings"], report["sides"]
    ours_side, base_side = sides["cellfoundry"], sides["baseline"]
    env = report.get("environment") or {}
    n_cells = (report.get("input") or {}).get("n_cells", settings.get("cells"))
    setting = f"{n_cells:,} cells, batch {settings['batch_size']}, {settings['pooling']} pooling"
    if env.get("device"):
        setting += f", {env['device']}, {env.get('dtype', '')}".rstrip(", ")
    caveat = f"one run per side; {report['contention_note']}" if "contention_note" in report else ""
    common = {
        "task": "embedding",
        "model": "",
        "source": source,
        "command": runnable_command("embedding_throughput", env.get("command"), settings),
        "setting": setting,
        "best_baseline": f"helical get_embs-style path ({settings['baseline_padding']} padding)",
    }
    ratios = report.get("ratios") or {}
    rows = []
    for field, metric, higher, target_text, ratio_key in _EMBEDDING_METRICS:
        if field not in ours_side or field not in base_side:
            continue
        scale = MIB if field.endswith("_bytes") else 1
        target = _find_target(report.get("targets"), *target_text) if target_text else None
        if target is not None:
            note = _target_note(target, f"{target['measured']}x")
        elif ratio_key and ratios.get(ratio_key) is not None:
            note = f"embedding {metric}, cellfoundry / baseline: {ratios[ratio_key]}x, no target"
        else:
            note = ""
        rows.append(
            SummaryRow(
                metric=metric,
                higher_is_better=higher,
                ours=_number(ours_side[field]) / scale,
                baseline=_number(base_side[field]) / scale,
                verdict=_verdict(target),
                note=_join(note, caveat),
                **common,
            )
        )
    return rows


# -- in_silico_memory.json -------------------------------------------------------------------
@readable("in_silico_memory")
def in_silico_rows(report: Report, source: str) -> list[SummaryRow]:
    """Peak RSS of one ``cellfoundry perturb`` process per (cells, batch size): whether memory
    grows with the cells perturbed. No baseline was run (the benchmark's verdict says why)."""
    settings = report.get("settings") or {}
    common = {
        "task": "in-silico",
        "model": str(settings.get("model", "")),
        "source": source,
        "command": runnable_command(
            "in_silico_memory", (report.get("environment") or {}).get("command"), settings
        ),
        "note": f"cellfoundry perturb: {report['verdict']}" if "verdict" in report else "",
    }
    return [
        SummaryRow(
            setting=f"{row['cells']:,} cells, batch {row['batch_size']}",
            metric="peak RSS (MiB)",
            higher_is_better=False,
            ours=_number(row["peak_rss_mib"]),
            **common,
        )
        for row in report["rows"]
    ]


EXTRACTORS: dict[str, Extractor] = {
    "tokenizer_throughput": tokenizer_rows,
    # encoder_throughput_cpu, _cuda, ...: the summary matches ``<key>_*`` stems to this key
    "encoder_throughput": encoder_rows,
    "embedding_throughput": embedding_rows,
    "in_silico_memory": in_silico_rows,
}
