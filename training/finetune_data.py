"""A user's fine-tuning files -> plain records -> token ids and labels, for sft, classification and NER.

Readers yield `(record, where)` with `where = "file:line"`, so every message can name the row. A single
bad row is a counted skip (TaskDataStats, with the first few reasons kept as notes); a problem that
would spoil the whole file (a missing column, a header that does not name the fields, a tag scheme
that is not understood, a file in which not one row is usable) raises DataError naming the file, the
line and the fix. Encoders take a transformers fast tokenizer; this module never imports torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The same ChatML template serving falls back to (serving/generation.py FALLBACK_CHAT_TEMPLATE), copied
# rather than imported: training must not depend on serving internals.
FALLBACK_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IGNORE_INDEX = -100
SFT_ROLES = ("system", "user", "assistant")
# ShareGPT-style `{"from": ..., "value": ...}` turns are common in users' files; map them to roles.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
TAG_SCHEMES = ("auto", "bio", "iob2", "iob1", "bioes", "iobes", "bilou")
MAX_NOTES = 20


class DataError(ValueError):
    """A row or file that cannot be used and must not be skipped silently; message names file, line, fix."""


@dataclass
class TaskDataStats:
    """What was read, and every skip counted by its reason (never a crash for a single bad row)."""

    files: int = 0
    rows: int = 0
    skipped_empty: int = 0
    skipped_malformed: int = 0  # includes lines that are not UTF-8 (see notes for each reason)
    skipped_too_long: int = 0
    truncated: int = 0
    unknown_labels: int = 0  # validation rows whose label is not in the train label set
    notes: list[str] = field(default_factory=list)

    def skip(self, kind: str, where: str, why: str) -> None:
        """Count one skipped row as `skipped_<kind>` and keep the first few reasons."""
        setattr(self, f"skipped_{kind}", getattr(self, f"skipped_{kind}") + 1)
        if len(self.notes) < MAX_NOTES:
            self.notes.append(f"{where}: skipped ({why})")

    @property
    def skipped(self) -> int:
        return self.skipped_empty + self.skipped_malformed + self.skipped_too_long


class _Malformed(Exception):
    """Internal: this row is skipped as malformed, for the reason given."""


# ---- file helpers -------------------------------------------------------------------------------
def _kind(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    return "conll"


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (relative to the working directory)")
    return path


def _iter_json_rows(path: Path, stats: TaskDataStats) -> Iterator[tuple[object, str]]:
    """JSON lines (or one JSON array in a .json file); undecodable and unparsable lines are counted skips."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a valid UTF-8 JSON array ({exc}); write one JSON object per line (jsonl)") from None
        for i, row in enumerate(rows):
            yield row, f"{path}:record {i + 1}"
        return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("malformed", where, "not UTF-8; re-encode the file as UTF-8")
                continue
            if not line.strip():
                stats.skip("empty", where, "blank line")
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as exc:
                stats.skip("malformed", where, f"not valid JSON: {exc.msg}")


def _iter_parquet_rows(path: Path, columns: list[str], what: str) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(
            f"{path}: no column {missing} (columns: {pf.schema_arrow.names}); set {what} to the column names"
        )
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield record, f"{path}:row {row}"


def _require_some_rows(path: Path, before: int, stats: TaskDataStats, first_error: str | None, fix: str) -> None:
    """A file that had rows but gave none is a configuration problem, not a few bad rows."""
    if stats.rows == before and first_error is not None:
        raise DataError(f"{first_error}; no usable row in {path}: {fix}")


def _text(value: object, where: str, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not UTF-8") from None
    if not isinstance(value, str):
        raise _Malformed(f"{what} must be a string, got {type(value).__name__}")
    return value


# ---- SFT ----------------------------------------------------------------------------------------
def _content(value: object) -> str:
    """A message's content: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise _Malformed(f"message content must be a string, got {type(value).__name__}")


def _sft_messages(row: object, messages_field: str, prompt_field: str, response_field: str, system_field: str | None):
    if not isinstance(row, dict):
        raise _Malformed(f"row must be a JSON object, got {type(row).__name__}")
    if row.get(messages_field) is not None:
        raw = row[messages_field]
        if not isinstance(raw, list):
            raise _Malformed(f"'{messages_field}' must be a list of {{role, content}}, got {type(raw).__name__}")
        messages = []
        for turn in raw:
            if not isinstance(turn, dict):
                raise _Malformed(f"each message must be an object with role and content, got {type(turn).__name__}")
            role = turn.get("role", turn.get("from"))
            if role not in ROLE_ALIASES:
                raise _Malformed(f"unknown role {role!r}; roles are {', '.join(SFT_ROLES)}")
            messages.append({"role": ROLE_ALIASES[role], "content": _content(turn.get("content", turn.get("value")))})
    elif prompt_field in row or response_field in row:
        prompt, response = row.get(prompt_field), row.get(response_field)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise _Malformed(f"'{prompt_field}' and '{response_field}' must both be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if system_field and isinstance(row.get(system_field), str) and row[system_field].strip():
            messages.insert(0, {"role": "system", "content": row[system_field]})
    else:
        raise _Malformed(f"no '{messages_field}' and no '{prompt_field}'/'{response_field}' fields (keys: {sorted(row)})")
    return messages


def read_sft_records(
    files: Iterable[str | Path],
    *,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    response_field: str = "response",
    system_field: str | None = None,
    stats: TaskDataStats,
) -> Iterator[tuple[list[dict], str]]:
    """Chat rows from jsonl/json/parquet: `messages` [{role, content}] or prompt/response fields -> messages.

    Unknown roles, wrong types and rows without an assistant turn are counted as malformed; rows whose
    assistant turns are all empty are counted as empty."""
    for path in map(_check_file, files):
        stats.files += 1
        before, first_error = stats.rows, None
        if _kind(path) == "parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(path).schema_arrow.names
            columns = [messages_field] if messages_field in names else [prompt_field, response_field]
            if system_field and system_field in names:
                columns.append(system_field)
            rows = _iter_parquet_rows(path, columns, "data.messages_field or data.prompt_field/response_field")
        else:
            rows = _iter_json_rows(path, stats)
        for row, where in rows:
            try:
                messages = _sft_messages(row, messages_field, prompt_field, response_field, system_field)
                if not any(m["role"] == "assistant" for m in messages):
                    raise _Malformed("no assistant message: nothing to learn from")
            except _Malformed as exc:
                first_error = first_error or f"{where}: {exc}"
                stats.skip("malformed", where, str(exc))
                continue
            if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
                stats.skip("empty", where, "empty assistant response")
                continue
            stats.rows += 1
            yield messages, where
        _require_some_rows(path, before, stats, first_error,
                           f"rows need '{messages_field}' [{{role, content}}] or '{prompt_field}'/'{response_field}' "
                           "strings; set data.messages_field / data.prompt_field / data.response_field")


# ---- classification -----------------------------------------------------------------------------
def _label_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _Malformed(f"label must be a non-empty string or integer, got {value!r}")


def _iter_delimited(path: Path, delimiter: str, text_field: str | int, label_field: str | int, stats: TaskDataStats):
    """csv/tsv rows as (text, label, where). Named fields need a header row; integer fields mean no header."""
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        # TSV is read without quote handling: tab-separated text often holds unbalanced quotes.
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        if isinstance(text_field, int) and isinstance(label_field, int):
            text_col, label_col = text_field, label_field
        else:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            missing = [f for f in (text_field, label_field) if f not in header]
            if missing:
                raise DataError(
                    f"{path}:1: the header row {header} has no column {missing}. If these are the column names, set "
                    f"data.text_field / data.label_field to them; if the first line is already data (no header), add "
                    f"a header line such as '{text_field}{delimiter}{label_field}' at the top of the file"
                )
            text_col, label_col = header.index(text_field), header.index(label_field)
        width = max(text_col, label_col) + 1
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < width:
                yield None, f"has {len(row)} column(s), needs at least {width}", where
                continue
            text, label = row[text_col], row[label_col]
            if any("\udc80" <= ch <= "\udcff" for ch in text + label):
                yield None, "not UTF-8; re-encode the file as UTF-8", where
                continue
            yield (text, label), None, where


def read_classification_records(
    files: Iterable[str | Path],
    *,
    text_field: str | int = "text",
    label_field: str | int = "label",
    fmt: str = "auto",
    stats: TaskDataStats,
) -> Iterator[tuple[tuple[str, str], str]]:
    """(text, label) rows from csv / tsv (header row names the fields; integer fields = no header), jsonl or
    parquet. Labels come back as strings (integers as their decimal string)."""
    for path in map(_check_file, files):
        stats.files += 1
        before, first_error = stats.rows, None
        kind = _kind(path, fmt)
        if kind in ("csv", "tsv"):
            rows = _iter_delimited(path, "\t" if kind == "tsv" else ",", text_field, label_field, stats)
        elif kind == "parquet":
            rows = ((r, None, w) for r, w in _iter_parquet_rows(path, [text_field, label_field], "data.text_field / data.label_field"))
        elif kind == "jsonl":
            rows = ((r, None, w) for r, w in _iter_json_rows(path, stats))
        else:
            raise DataError(f"{path}: cannot tell the format from the suffix; use .csv, .tsv, .jsonl or .parquet")
        for row, problem, where in rows:
            try:
                if problem:
                    raise _Malformed(problem)
                if isinstance(row, dict):
                    if text_field not in row or label_field not in row:
                        raise _Malformed(f"no '{text_field}' or '{label_field}' field (keys: {sorted(row)})")
                    row = (row[text_field], row[label_field])
                elif not isinstance(row, tuple):
                    raise _Malformed(f"row must be an object with '{text_field}' and '{label_field}'")
                text = _text(row[0], where, "text")
                if not text.strip():
                    stats.skip("empty", where, "empty text")
                    continue
                label = _label_str(row[1])
            except _Malformed as exc:
                first_error = first_error or f"{where}: {exc}"
                stats.skip("malformed", where, str(exc))
                continue
            stats.rows += 1
            yield (text, label), where
        _require_some_rows(path, before, stats, first_error,
                           f"set data.text_field / data.label_field to the fields holding the text and the label")


# NER reading (training/finetune_ner.py) and the encoders (training/finetune_encode.py) import this module's
# types; they are part of this module's public API, resolved on first use so any of them can be imported first.
_ELSEWHERE = {
    "finetune_ner": ("read_ner_records", "to_bio", "ner_label_list"),
    "finetune_encode": ("encode_sft", "encode_classification", "encode_ner", "word_tags_from_subtokens", "pack_sft",
                        "ner_tag_subtoken", "NER_TAG_SUBTOKENS", "resolve_ner_input", "ner_separator"),
}


def __getattr__(name: str):
    for module, names in _ELSEWHERE.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f"training.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataError", "TaskDataStats", "FALLBACK_CHATML", "IGNORE_INDEX", "read_sft_records", "read_classification_records",
    *(name for names in _ELSEWHERE.values() for name in names),
]
