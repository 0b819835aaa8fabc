"""Model names, model cards and Hub helpers.

A checkpoint is found by shipped name (``cellfoundry-tiny-bert``: a folder inside the package),
local folder, or Hugging Face Hub id (``org/name``; downloaded only by an explicit load, and
read from the local cache when ``HF_HUB_OFFLINE=1``). ``save_pretrained`` of every cellfoundry
model also writes ``README.md`` (a model card in the Hub's format, rendered by huggingface_hub)
and ``card.json`` (the facts behind it, so a reloaded model keeps its card).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellfoundry._io import atomic_write_text
from cellfoundry.tokenization.registry import is_hub_repo_id

CARD_FILE = "card.json"


def shipped_models_dir() -> Path:
    """Folder of the checkpoints shipped inside the package."""
    return Path(__file__).resolve().parent / "_data" / "models"


def shipped_models() -> dict[str, Path]:
    """Shipped model name -> folder (those with a ``config.json``)."""
    root = shipped_models_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def model_path(name: str) -> Path:
    """Folder of a shipped checkpoint, for ``AutoModel.from_pretrained(model_path(name))``."""
    shipped = shipped_models()
    if name not in shipped:
        available = sorted(shipped) or "none in this install"
        raise ValueError(f"No shipped model {name!r}; shipped models: {available}.")
    return shipped[name]


def resolve_model(name_or_path: str | Path) -> str:
    """A shipped name, an existing folder, or a Hub id, as a ``from_pretrained`` argument."""
    text = str(name_or_path)
    if text in shipped_models():
        return str(model_path(text))
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a model folder (config.json missing); save one with "
                "model.save_pretrained(path) or name a shipped model or a Hub id."
            )
        return text
    if is_hub_repo_id(text) and not path.exists():
        return text
    raise ValueError(
        f"Unknown model {text!r}: not a shipped name ({sorted(shipped_models())}), not a "
        "folder with config.json, and not a Hub id 'org/name'."
    )


@dataclass
class ModelCardInfo:
    """What a model card says beyond the config: data, compute, metrics, limits.

    ``metrics`` rows are dicts with ``task``, ``metric``, ``ours``, ``baseline`` (name),
    ``baseline_value``, ``difference`` and ``ci`` (95% interval, text), as in the benchmark
    summary; a row where the baseline wins is shown as such.
    """

    license: str = "apache-2.0"
    species: list[str] = field(default_factory=lambda: ["human"])
    training_data: str = "not recorded"
    n_cells: int | None = None
    compute: str = "not recorded"
    intended_use: str = (
        "Zero-shot cell embeddings and a starting point for LoRA fine-tuning on "
        "single-cell and spatial transcriptomics (research use)."
    )
    limitations: str = (
        "Trained on a small corpus; compare against simple baselines (PCA, logistic "
        "regression) on your own data before relying on it."
    )
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, directory: str | Path) -> ModelCardInfo | None:
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def _metrics_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No quality figures are recorded for this checkpoint yet."
    lines = [
        "| task | metric | this model | best baseline | baseline value | difference (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.get('task', '')} | {row.get('metric', '')} | {row.get('ours', '')} | "
            f"{row.get('baseline', '')} | {row.get('baseline_value', '')} | "
            f"{row.get('difference', '')} {row.get('ci', '')} |"
        )
    return "\n".join(lines)


def render_model_card(config: Any, info: ModelCardInfo, name: str = "cellfoundry model") -> str:
    """Model card text: YAML metadata (huggingface_hub's format) and a Markdown body."""
    from huggingface_hub import ModelCardData

    from cellfoundry.bench.cards import rows_for, summary_table

    data = ModelCardData(
        library_name="cellfoundry",
        license=info.license,
        tags=["cellfoundry", "single-cell", "transcriptomics", config.model_type, *info.tags],
        species=info.species,
        tokenizer_id=config.tokenizer_id,
        vocab_sha256=config.vocab_sha256,
        context_length=config.max_position_embeddings,
        corpus_cells=info.n_cells,
    )
    load_line = (
        f'import cellfoundry\n\nmodel = cellfoundry.load_model("{name}")\n'
        f'embeddings = cellfoundry.embed(adata, model="{name}")'
    )
    body = f"""
# {name}

A `{config.model_type}` encoder ({config.num_hidden_layers} layers, hidden size
{config.hidden_size}, context {config.max_position_embeddings} tokens) over rank-value gene
tokens from tokenizer `{config.tokenizer_id}` (vocab sha256 `{config.vocab_sha256}`).

## Intended use

{info.intended_use}

## How to load

```python
{load_line}
```

or `AutoModel.from_pretrained(path)` after `import cellfoundry.models`.

## Training data and compute

{info.training_data}

Cells: {info.n_cells if info.n_cells is not None else "not recorded"}. Compute: {info.compute}.

## Metrics beside baselines

{_metrics_table(info.metrics)}

## Benchmark summary

Rows of `benchmarks/results/SUMMARY.md` measured with this model (mean over seeds, best
baseline of the same run, 95% interval of the difference):

{summary_table(rows_for(name))}

## Limitations

{info.limitations}
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_model_card(model: Any, directory: str | Path, info: ModelCardInfo | None = None) -> Path:
    """Write ``README.md`` and ``card.json`` for ``model`` into ``directory`` (atomically)."""
    directory = Path(directory)
    info = info or getattr(model, "card_info", None) or ModelCardInfo()
    name = getattr(model, "card_name", None) or directory.name
    atomic_write_text(directory / CARD_FILE, json.dumps(asdict(info), indent=2) + "\n")
    return atomic_write_text(directory / "README.md", render_model_card(model.config, info, name))


def push_to_hub(model: Any, repo_id: str, private: bool = True, **kwargs: Any) -> str:
    """Upload weights, config and model card to ``repo_id`` (explicit network call)."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)
    return repo_id
