"""Answer metrics against hand-computed values."""

import pytest

from toolkit.metrics import (exact_match, first_label, gold_match, label_agreement, label_set, normalize, rouge_l,
                             token_f1)

LABELS = ["ACCOUNT", "ORDER", "REFUND", "SHIPPING_ADDRESS", "CANCELLATION_FEE"]


def test_normalize():
    assert normalize("  The REFUND, please!  ") == "refund please"
    assert normalize("SHIPPING_ADDRESS.") == "shipping_address"  # underscores survive: labels keep their shape


def test_exact_and_f1():
    assert exact_match("Refund.", "refund") == 1.0
    assert exact_match("refund order", "refund") == 0.0
    # pred tokens {refund, order}, ref {refund}: P=1/2, R=1 -> F1=2/3
    assert token_f1("refund order", "refund") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_rouge_l():
    # LCS("w x y z", "w y z v") = "w y z" (3): P=3/4, R=3/4
    assert rouge_l("w x y z", "w y z v") == pytest.approx(0.75)
    assert rouge_l("the cat", "cat") == 1.0  # articles are dropped before comparing
    assert rouge_l("x y", "z") == 0.0


def test_gold_match_with_label_set_takes_first_label():
    assert gold_match("The category is REFUND.", "REFUND", LABELS) == 1.0
    assert gold_match("REFUND, not ORDER", "ORDER", LABELS) == 0.0
    assert gold_match("shipping_address", "SHIPPING_ADDRESS", LABELS) == 1.0
    assert gold_match("I cannot tell", "ORDER", LABELS) == 0.0
    assert first_label("order then refund", LABELS) == "ORDER"


def test_gold_match_without_labels():
    assert gold_match("the answer is 42", "42") == 1.0
    assert gold_match("420", "42") == 0.0
    assert gold_match("anything", "") == 0.0


def test_label_agreement_compares_first_labels_not_phrasing():
    assert label_agreement("REFUND", "This message is about a refund request.", LABELS) == 1.0
    assert label_agreement("order, then refund", "refund", LABELS) == 0.0  # first labels ORDER vs REFUND
    assert label_agreement("It is about an order", "I cannot tell", LABELS) == 0.0  # one names none
    # neither names a label: they agree only when the texts match (normalized)
    assert label_agreement("I cannot tell.", "i cannot tell", LABELS) == 1.0
    assert label_agreement("I cannot tell", "No idea", LABELS) == 0.0


def test_label_set_only_for_few_distinct_references():
    assert label_set(["B", "A", "B", None, ""]) == ["A", "B"]
    assert label_set(["A", "A"]) is None  # one value: nothing to choose between
    assert label_set([f"answer {i}" for i in range(51)]) is None  # free text, not a label set
    assert label_set([f"L{i}" for i in range(50)]) is not None
