"""JSON schemas of the benchmark outputs, checked whenever a file is written.

Two documents (described for people in ``benchmarks/README.md``):

- ``RESULTS_SCHEMA``: the envelope every ``benchmarks/results/<name>.json`` shares. Each
  benchmark records its own figures in its own shape, but every file names the benchmark and
  the command that produced it (top level ``environment.command``, or one per dataset block
  for the scripts that merge datasets run at different times), so every number can be traced
  back to a command.
- ``SUMMARY_SCHEMA``: ``summary.json``, the rows behind ``SUMMARY.md``, strict: each row is a
  :class:`cellfoundry.bench.rows.SummaryRow`.
"""

from __future__ import annotations

from typing import Any

from cellfoundry.bench.rows import VERDICTS

_ENVIRONMENT = {
    "type": "object",
    "required": ["command"],
    "properties": {"command": {"type": "string", "minLength": 1}},
}

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cellfoundry benchmark results",
    "type": "object",
    "required": ["benchmark"],
    "properties": {
        "benchmark": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
        "environment": _ENVIRONMENT,
    },
    "anyOf": [
        {"required": ["environment"]},
        {
            "required": ["datasets"],
            "properties": {
                "datasets": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {
                        "type": "object",
                        "required": ["environment"],
                        "properties": {"environment": _ENVIRONMENT},
                    },
                }
            },
        },
    ],
}

_NUMBER_OR_NULL = {"type": ["number", "null"]}

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cellfoundry benchmark summary",
    "type": "object",
    "required": ["generated_utc", "environment", "rows", "sources"],
    "properties": {
        "generated_utc": {"type": "string"},
        "environment": {"type": "object"},
        "sources": {"type": "object"},
        "rows": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "task",
                    "setting",
                    "metric",
                    "higher_is_better",
                    "ours",
                    "model",
                    "source",
                    "command",
                    "verdict",
                ],
                "properties": {
                    "task": {"type": "string", "minLength": 1},
                    "setting": {"type": "string"},
                    "metric": {"type": "string", "minLength": 1},
                    "higher_is_better": {"type": "boolean"},
                    "ours": {"type": "number"},
                    "ours_sd": _NUMBER_OR_NULL,
                    "model": {"type": "string"},
                    "source": {"type": "string", "pattern": r"\.json$"},
                    "command": {"type": "string", "minLength": 1},
                    "best_baseline": {"type": ["string", "null"]},
                    "baseline": _NUMBER_OR_NULL,
                    "baseline_sd": _NUMBER_OR_NULL,
                    "difference": _NUMBER_OR_NULL,
                    "ci95": {
                        "oneOf": [
                            {"type": "null"},
                            {
                                "type": "array",
                                "items": {"type": "number"},
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        ]
                    },
                    "n_seeds": {"type": "integer", "minimum": 1},
                    "verdict": {"enum": list(VERDICTS)},
                    "per_seed": {"type": "array", "items": {"type": "string"}},
                    "note": {"type": "string"},
                },
            },
        },
    },
}


def validate(document: dict[str, Any], schema: dict[str, Any], name: str) -> None:
    """Raise ``ValueError`` naming the file and every violation (not just the first)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = []
    for error in validator.iter_errors(document):
        # an anyOf failure says only "not valid under any"; its alternatives say where
        errors.extend([error, *error.context] if error.context else [error])
    errors.sort(key=lambda e: [str(part) for part in e.absolute_path])
    if errors:
        lines = [
            f"  at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
        ]
        raise ValueError(
            f"{name} does not follow the {schema['title']} schema "
            f"(benchmarks/README.md, 'Results schema'):\n" + "\n".join(lines[:20])
        )


def validate_results(report: dict[str, Any], name: str = "results") -> None:
    validate(report, RESULTS_SCHEMA, name)


def validate_summary(summary: dict[str, Any], name: str = "summary.json") -> None:
    validate(summary, SUMMARY_SCHEMA, name)
