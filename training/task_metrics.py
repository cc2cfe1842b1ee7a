"""Task metrics from counts that sum across ranks: confusion matrices and entity counts (no torch).

Distributed evaluation sums the counts over workers (all_reduce) and calls these on the totals, so
every worker count gives the same figures as one process over the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """counts[true][pred]. Rows with a negative true id (a label unknown to the model) are left out."""
    counts = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred):
        if 0 <= t < num_labels and 0 <= p < num_labels:
            counts[int(t)][int(p)] += 1
    return counts


def classification_metrics(confusion: Sequence[Sequence[int]]) -> dict[str, float]:
    """{"accuracy", "macro_f1"} from a (summed) confusion matrix.

    Macro-F1 averages the per-label F1 over labels that occur in the gold or the predictions (as
    scikit-learn does); a gold label that is never predicted counts with F1 = 0."""
    n = len(confusion)
    total = sum(sum(row) for row in confusion)
    correct = sum(confusion[i][i] for i in range(n))
    f1s = []
    for i in range(n):
        gold = sum(confusion[i])
        predicted = sum(confusion[r][i] for r in range(n))
        if gold == 0 and predicted == 0:
            continue
        f1s.append(2 * confusion[i][i] / (gold + predicted))
    return {
        "accuracy": correct / total if total else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
    }


def _split(tag: str) -> tuple[str, str]:
    if tag in ("O", ".", ""):
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep:
        raise ValueError(f"tag {tag!r} is not 'O' or PREFIX-TYPE (B-X, I-X, E-X, S-X)")
    return prefix, kind


def _chunk_end(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # conlleval's endOfChunk (with the E/S rules of its IOBES extension).
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _chunk_start(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # conlleval's startOfChunk: an I- (or E-) that does not continue an entity of its type starts one.
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("I", "E"):
        return True
    return tag != "O" and prev_type != type_


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities as (type, start, end) token spans, end exclusive, with conlleval semantics: I-X after O
    or after another type starts an entity; a type change ends one."""
    spans: set[tuple[str, int, int]] = set()
    start, kind = None, ""
    prev_tag, prev_type = "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = _split(tag)
        if start is not None and _chunk_end(prev_tag, prefix, prev_type, type_):
            spans.add((kind, start, i))
            start = None
        if _chunk_start(prev_tag, prefix, prev_type, type_):
            start, kind = i, type_
        prev_tag, prev_type = prefix, type_
    return spans


def ner_counts(gold_tags: Sequence[str], pred_tags: Sequence[str]) -> tuple[int, int, int]:
    """(correct, predicted, gold) entities of one sentence: correct means the same type and exact span."""
    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"{len(gold_tags)} gold tags but {len(pred_tags)} predicted tags")
    gold, pred = entity_spans(gold_tags), entity_spans(pred_tags)
    return len(gold & pred), len(pred), len(gold)


def ner_metrics(correct: int, predicted: int, gold: int) -> dict[str, float]:
    """Entity-level {"precision", "recall", "f1"} from summed counts (0 where undefined, as conlleval)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
