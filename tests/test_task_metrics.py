"""Task metrics against hand-computed examples (conlleval semantics for entities)."""

import pytest

from training.task_metrics import classification_metrics, confusion_matrix, entity_spans, ner_counts, ner_metrics


@pytest.mark.parametrize("tags,spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),
    # I- after O starts an entity (conlleval), and so does I- after another type.
    (["O", "I-PER", "I-PER", "I-LOC"], {("PER", 1, 3), ("LOC", 3, 4)}),
    # A type change inside "B-X I-Y" splits; B- after I- of the same type splits.
    (["B-PER", "I-LOC", "B-LOC", "B-LOC", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 2), ("LOC", 2, 3), ("LOC", 3, 5)}),
    (["I-ORG"], {("ORG", 0, 1)}),
    (["O", "O"], set()),
    ([], set()),
    # BIOES: E closes, S is a one-token entity, I after E starts a new one.
    (["S-PER", "B-LOC", "E-LOC", "I-LOC", "E-LOC"], {("PER", 0, 1), ("LOC", 1, 3), ("LOC", 3, 5)}),
])
def test_entity_spans_follow_conlleval(tags, spans):
    assert entity_spans(tags) == spans


def test_ner_counts_partial_matches_and_type_errors_are_wrong():
    gold = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"]
    pred = ["B-PER", "O", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"]
    # PER predicted one token short (wrong), LOC exact, ORG exact.
    assert ner_counts(gold, pred) == (2, 3, 3)
    pred_type = ["B-ORG", "I-ORG", "O", "B-LOC", "O", "B-ORG", "I-ORG", "B-ORG"]
    # PER labelled ORG (wrong type), LOC right, the ORG split in two (both wrong): 1 correct of 4 predicted.
    assert ner_counts(gold, pred_type) == (1, 4, 3)
    # A stray I- after O is an entity of its own for both sides.
    assert ner_counts(["O", "I-LOC"], ["O", "B-LOC"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="2 gold tags but 1 predicted"):
        ner_counts(["O", "O"], ["O"])


def test_ner_metrics_from_summed_counts():
    counts = [ner_counts(["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "O"]),  # (1, 1, 2)
              ner_counts(["B-ORG", "O"], ["B-ORG", "B-LOC"])]                              # (1, 2, 1)
    correct, predicted, gold = (sum(c[i] for c in counts) for i in range(3))
    assert (correct, predicted, gold) == (2, 3, 3)
    m = ner_metrics(correct, predicted, gold)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert ner_metrics(0, 0, 5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert ner_metrics(3, 4, 6)["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)


def test_macro_f1_counts_a_never_predicted_label_as_zero():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 1]
    confusion = confusion_matrix(y_true, y_pred, 4)
    assert confusion == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    m = classification_metrics(confusion)
    # F1: label 0 = 1, label 1 = 2*2/(2+3) = 0.8, label 2 = 0 (never predicted); label 3 absent on both sides.
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((1 + 0.8 + 0) / 3)


def test_confusion_matrices_sum_across_ranks_and_skip_unknown_labels():
    y_true, y_pred = [0, 1, 2, 2, 1, 0, -1], [0, 2, 2, 1, 1, 0, 0]
    whole = confusion_matrix(y_true, y_pred, 3)
    halves = [confusion_matrix(y_true[:3], y_pred[:3], 3), confusion_matrix(y_true[3:], y_pred[3:], 3)]
    summed = [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(*halves)]
    assert summed == whole and sum(map(sum, whole)) == 6  # the -1 (label unknown to the model) is left out
    assert classification_metrics(whole)["accuracy"] == pytest.approx(4 / 6)
    assert classification_metrics([[0, 0], [0, 0]]) == {"accuracy": 0.0, "macro_f1": 0.0}
