"""Find tokenizers: shipped ids, local folders, or Hugging Face Hub repos.

Shipped artifacts live in the repository's top-level ``tokenizers/`` (data only); a wheel
carries them as ``cellfoundry/_artifacts/tokenizers`` (hatch ``force-include``). Both places
are searched, so an editable install and a wheel install find the same files.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from cellfoundry.tokenization.rank_value import CONFIG_FILE, RankValueTokenizer

DEFAULT_TOKENIZER = "cf-human-v1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hugging Face Hub repo id (``org/name``)."""
    return bool(_HUB_ID.match(text))


def artifact_roots() -> list[Path]:
    """Folders that may hold shipped tokenizer artifacts, wheel location first."""
    package = Path(__file__).resolve().parents[1]
    roots = [package / "_artifacts" / "tokenizers"]
    source_tree = package.parents[1] / "tokenizers"  # src/cellfoundry -> repo root (editable)
    roots.append(source_tree)
    return [root for root in roots if root.is_dir()]


def shipped_tokenizers() -> dict[str, Path]:
    """Map of shipped tokenizer id -> artifact folder."""
    found: dict[str, Path] = {}
    for root in artifact_roots():
        for folder in sorted(root.iterdir()):
            if (folder / CONFIG_FILE).is_file():
                found.setdefault(folder.name, folder)
    return found


def resolve_tokenizer_path(name_or_path: str | Path) -> Path:
    """Return the artifact folder for a shipped id, a local path, or a Hub repo id."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate
    shipped = shipped_tokenizers()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    if is_hub_repo_id(str(name_or_path)):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(name_or_path)))
    raise ValueError(
        f"Unknown tokenizer {name_or_path!r}: not a folder, not shipped ({sorted(shipped)}), "
        "and not a Hub id 'org/name'."
    )


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> RankValueTokenizer:
    return RankValueTokenizer.from_directory(path)


def load_tokenizer(name_or_path: str | Path | RankValueTokenizer = DEFAULT_TOKENIZER):
    """Load a :class:`RankValueTokenizer` by shipped id, folder, or Hub id (cached per folder)."""
    if isinstance(name_or_path, RankValueTokenizer):
        return name_or_path
    return _load_cached(str(resolve_tokenizer_path(name_or_path).resolve()))
