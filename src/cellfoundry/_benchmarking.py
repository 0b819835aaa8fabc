"""What the scripts in ``benchmarks/`` share: environment records, measured child runs, output.

Each benchmark is a script run (or loaded by tests) by its path, so the scripts cannot import
one another; the pieces they have in common live here instead. Nothing in the package uses
this module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cellfoundry._io import atomic_write_text


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or ``None`` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (``None`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_state(root: Path) -> dict[str, Any]:
    """The commit measured and whether ``src/`` had uncommitted changes at the time."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=root, capture_output=True, text=True
        ).stdout.strip()

    return {
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_uncommitted_changes_under_src": bool(git("status", "--porcelain", "--", "src")),
    }


def run_finetuning_process(
    task: str, data: Path, out: Path, max_steps: int, overrides: list[str], description: str
) -> dict[str, Any]:
    """Run ``finetuning/finetune.py --task TASK`` in a child process with the settings every
    benchmark shares (final evaluation only, quiet, overwriting ``out``) plus ``overrides``;
    its ``test_metrics.json`` and wall time."""
    import time

    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        str(root / "finetuning" / "finetune.py"),
        "--task",
        task,
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(max_steps),
        f"eval_every={max_steps}",
        "log_every=10",
        "overwrite_output_dir=true",
        "progress_bar=false",
        *overrides,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{description} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((Path(out) / "test_metrics.json").read_text())
    return {"metrics": metrics, "wall_s": round(time.perf_counter() - start, 1)}


def short_environment() -> dict[str, Any]:
    """Command, versions and time of a benchmark run (the scripts without child metering)."""
    import time

    return {
        "command": command_line(),
        "versions": {
            n: package_version(n) for n in ("torch", "peft", "scikit-learn", "cellfoundry")
        },
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line() -> str:
    """How this benchmark was started (script name and arguments)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


# A small launcher fork()s and exec()s the measured command and reads its rusage with
# os.wait4. Linux carries the pre-exec address space's high-water mark into ru_maxrss, so a
# child started straight from a benchmark process (torch imported: several hundred MiB) would
# report that as a floor; the launcher's few MiB are the floor instead (launcher_vmhwm_kib).
LAUNCHER = r"""
import json, os, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        os.execv(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
print(json.dumps({
    "wall": wall, "status": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
    "utime": usage.ru_utime, "stime": usage.ru_stime,
    "launcher_vmhwm_kib": int(
        [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    ),
}))
"""


def run_measured(
    cmd: list[str], log: Path, description: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr to ``log``) through :data:`LAUNCHER`.

    Returns its usage: ``wall`` seconds, ``maxrss_kib``, ``utime``/``stime`` CPU seconds,
    ``launcher_vmhwm_kib`` and the exit ``status`` (0). Raises ``RuntimeError`` with the end
    of the log when the command fails.
    """
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(log), *cmd], capture_output=True, text=True, env=env
    )
    if launched.returncode != 0:
        raise RuntimeError(f"launcher failed:\n{launched.stderr[-3000:]}")
    usage = json.loads(launched.stdout)
    if usage["status"] != 0:
        text = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(f"{description} failed ({usage['status']}):\n{text[-3000:]}")
    return usage


def write_report(output: Path, report: dict[str, Any], markdown: str) -> None:
    """Write ``report`` as JSON to ``output`` and ``markdown`` beside it (``.md``), atomically,
    after checking it against the results schema (nothing is written when it fails)."""
    from cellfoundry.bench.schema import validate_results

    text = json.dumps(report, indent=2, default=str)
    validate_results(json.loads(text), output.name)  # the document as it will be read back
    atomic_write_text(output, text + "\n")
    atomic_write_text(output.with_suffix(".md"), markdown)
