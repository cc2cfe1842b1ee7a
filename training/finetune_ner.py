"""NER files -> (words, BIO tags): CoNLL and jsonl/parquet readers and tag scheme conversion.

Public through training.finetune_data (same counted skips and DataError messages as the other readers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from training.finetune_data import (
    TAG_SCHEMES,
    DataError,
    TaskDataStats,
    _check_file,
    _iter_json_rows,
    _iter_parquet_rows,
    _kind,
    _Malformed,
    _require_some_rows,
)


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or not kind or prefix not in ("B", "I", "E", "S", "L", "U"):
        raise ValueError(f"tag {tag!r} is not 'O' or PREFIX-TYPE with a B/I/E/S/L/U prefix")
    return prefix, kind


def to_bio(tags: list[str], scheme: str) -> list[str]:
    """Convert IOB1, BIOES/IOBES/BILOU (or repair BIO) tags to BIO.

    IOB1 marks B- only between two adjacent entities of one type, so an I-X that does not continue an X
    becomes B-X; BIOES's S-/E- (BILOU's U-/L-) become B-/I-. Applied to valid BIO, the result is unchanged,
    and the conlleval spans of the input are kept, which is why "auto" can apply all rules at once.
    Raises ValueError for an unknown scheme or a tag the scheme does not allow."""
    scheme = scheme.lower()
    if scheme not in TAG_SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; use one of {', '.join(TAG_SCHEMES)}")
    allowed = {"bio": "BI", "iob2": "BI", "iob1": "BI", "bioes": "BIES", "iobes": "BIES", "bilou": "BILU", "auto": "BIESLU"}[scheme]
    out: list[str] = []
    prev_kind = ""
    for tag in tags:
        prefix, kind = _split_tag(tag)
        if prefix != "O" and prefix not in allowed:
            raise ValueError(f"tag {tag!r} is not allowed in scheme {scheme!r} (prefixes {', '.join(allowed)}, or O)")
        if prefix == "O":
            out.append("O")
        elif prefix in ("B", "S", "U"):
            out.append(f"B-{kind}")
        else:  # I, E, L: continue an open entity of the same type, else start one
            out.append(f"I-{kind}" if prev_kind == kind else f"B-{kind}")
        # After E/S/L/U the entity is closed, so a following I- must start a new one.
        prev_kind = kind if prefix in ("B", "I") else ""
    return out


def _bio_or_error(tags: list[str], scheme: str, where: str) -> list[str]:
    try:
        return to_bio(tags, scheme)
    except ValueError as exc:
        raise DataError(
            f"{where}: {exc}; set data.tag_scheme to the file's scheme (bio, iob1, bioes, bilou) or fix the tag"
        ) from None


def _iter_conll(path: Path, token_column: int, tag_column: int, stats: TaskDataStats):
    """(tokens, tags, problem, where) per sentence of a CoNLL file; where is the sentence's first line."""
    tokens: list[str] = []
    tags: list[str] = []
    problem: str | None = None
    start = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                problem = problem or f"line {lineno} is not UTF-8; re-encode the file as UTF-8"
                start = start or lineno
                continue
            if not line:
                if tokens or problem:
                    yield tokens, tags, problem, f"{path}:{start}"
                tokens, tags, problem, start = [], [], None, 0
                continue
            columns = line.split()
            if columns[0] == "-DOCSTART-":  # a document boundary also ends a sentence
                if tokens or problem:
                    yield tokens, tags, problem, f"{path}:{start}"
                tokens, tags, problem, start = [], [], None, 0
                continue
            start = start or lineno
            try:
                token, tag = columns[token_column], columns[tag_column]
            except IndexError:
                problem = problem or f"line {lineno} has {len(columns)} column(s); token column {token_column}, tag column {tag_column}"
                continue
            if len(columns) < 2:
                problem = problem or f"line {lineno} has one column; CoNLL lines need a token and a tag"
                continue
            tokens.append(token)
            tags.append(tag)
    if tokens or problem:
        yield tokens, tags, problem, f"{path}:{start}"


def read_ner_records(
    files: Iterable[str | Path],
    *,
    fmt: str = "auto",
    token_column: int = 0,
    tag_column: int = -1,
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    scheme: str = "auto",
    stats: TaskDataStats,
) -> Iterator[tuple[tuple[list[str], list[str]], str]]:
    """(words, BIO tags) sentences from CoNLL files (whitespace columns, blank line between sentences,
    -DOCSTART- ignored) or jsonl/parquet rows with token and tag lists. Tags are converted to BIO."""
    if scheme.lower() not in TAG_SCHEMES:
        raise DataError(f"data.tag_scheme: unknown tag scheme {scheme!r}; use one of {', '.join(TAG_SCHEMES)}")
    for path in map(_check_file, files):
        stats.files += 1
        before, first_error = stats.rows, None
        kind = _kind(path, fmt)
        if kind == "conll" or kind in ("txt", "tsv", "csv") and fmt in ("auto", "conll"):
            rows = ((t, g, p, w) for t, g, p, w in _iter_conll(path, token_column, tag_column, stats))
        elif kind in ("jsonl", "parquet"):
            source = (_iter_json_rows(path, stats) if kind == "jsonl"
                      else _iter_parquet_rows(path, [tokens_field, tags_field], "data.tokens_field / data.tags_field"))
            rows = ((r, None, None, w) for r, w in source)
        else:
            raise DataError(f"{path}: unknown NER format {kind!r}; use conll, jsonl or parquet")
        for words, tags, problem, where in rows:
            try:
                if problem:
                    raise _Malformed(problem)
                if tags is None:  # a jsonl/parquet row
                    row = words
                    if not isinstance(row, dict) or tokens_field not in row or tags_field not in row:
                        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                        raise _Malformed(f"no '{tokens_field}' or '{tags_field}' field (got {keys})")
                    words, tags = row[tokens_field], row[tags_field]
                    if not isinstance(words, list) or not isinstance(tags, list):
                        raise _Malformed(f"'{tokens_field}' and '{tags_field}' must be lists")
                    if not all(isinstance(w, str) for w in words) or not all(isinstance(t, str) for t in tags):
                        raise _Malformed("tokens and tags must be strings (integer tag ids need label names: "
                                         "write the tag strings)")
                if len(words) != len(tags):
                    raise _Malformed(f"{len(words)} tokens but {len(tags)} tags")
                if not words:
                    stats.skip("empty", where, "no tokens")
                    continue
                if any(not w.strip() for w in words):
                    raise _Malformed("an empty token")
            except _Malformed as exc:
                first_error = first_error or f"{where}: {exc}"
                stats.skip("malformed", where, str(exc))
                continue
            stats.rows += 1
            yield (list(words), _bio_or_error(list(tags), scheme, where)), where
        _require_some_rows(path, before, stats, first_error,
                           f"CoNLL needs token and tag columns (data.token_column / data.tag_column); jsonl needs "
                           f"'{tokens_field}'/'{tags_field}' lists (data.tokens_field / data.tags_field)")


def ner_label_list(tags: Iterable[str]) -> list[str]:
    """Label set in id order: 'O', then B-X, I-X per entity type (sorted). Every B-X gets its I-X, which a
    word split into several sub-tokens needs even when the data has only one-word entities."""
    kinds = sorted({_split_tag(t)[1] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]
