"""The records of `resnet predict`, shared by its local and Ray engines: columns, rows, labels, file formats."""

from __future__ import annotations

from pathlib import Path

from resnetcli.cli.output import OutputFormat

PREDICT_COLUMNS = ["input", "arch", "weights", "rank", "index", "label", "prob", "error"]


def prediction_rows(record: dict) -> list[dict]:
    """One flat row per ranked class (one row with the error for a failed input)."""
    if "error" in record:
        return [{"input": record["input"], "error": record["error"]}]
    base = {"input": record["input"], "arch": record["arch"], "weights": record["weights"]}
    return [{**base, **score} for score in record["top"]] or [base]


def read_labels(path: Path) -> list[str]:
    """Class names from a text file (one per line) or JSON (a list, or an index-to-name map)."""
    import json

    from resnetcli.errors import UsageError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--labels {path}: cannot read: {error}") from None
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except ValueError as error:
            raise UsageError(f"--labels {path}: invalid JSON: {error}") from None
        if isinstance(data, list):
            return [str(label) for label in data]
        try:
            indexed = {int(key): str(value) for key, value in data.items()}
        except (TypeError, ValueError):
            raise UsageError(f"--labels {path}: a JSON map must go from class index to name") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise UsageError(f"--labels {path}: class indices must be 0..{len(indexed) - 1} without gaps")
        return [indexed[i] for i in range(len(indexed))]
    return [line.strip() for line in text.splitlines() if line.strip()]


def one_line(text: str) -> str:
    """Text with line breaks escaped, so that a file name holding one keeps its error on one stderr line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


#: `--output` file suffixes that choose a format when `--format` is not given.
SUFFIX_FORMATS = {
    ".json": OutputFormat.json,
    ".jsonl": OutputFormat.jsonl,
    ".ndjson": OutputFormat.jsonl,
    ".csv": OutputFormat.csv,
    ".tsv": OutputFormat.tsv,
}
