"""Student-vs-teacher comparison (toolkit.distill.evaluate.compare) against hand-computed values."""

import pytest

from toolkit.distill.evaluate import compare

REFS = ["ORDER", "REFUND", "ACCOUNT", "ORDER"]


def _records(outputs):
    return [{"id": str(i), "output": o, "reference": REFS[i]} for i, o in enumerate(outputs)]


def test_label_agreement_counts_decisions_while_exact_counts_phrasing():
    teacher = _records(["This message is about an order.", "refund", "I am not sure what", "REFUND"])
    student = [{"id": str(i), "output": o} for i, o in
               enumerate(["ORDER", "It is about a refund request.", "I am not sure what", "ORDER"])]
    out = compare(student, teacher, REFS)
    # label pairs: (ORDER, ORDER) yes, (REFUND, REFUND) yes, (None, None) with equal text yes, (ORDER, REFUND) no
    assert out["agreement_label"] == pytest.approx(3 / 4)
    assert out["agreement_exact"] == pytest.approx(1 / 4)  # only the identical unlabeled answer
    # gold: teacher right on 0 and 1 -> 2/4; student right on 0, 1 and 3 -> 3/4
    assert out["teacher_gold_accuracy"] == pytest.approx(0.5)
    assert out["student_gold_accuracy"] == pytest.approx(0.75)
    assert out["gold_ratio"] == pytest.approx(1.5)


def test_no_label_agreement_when_references_are_free_text():
    refs = [f"a long free-text answer number {i}" for i in range(60)]
    teacher = [{"id": str(i), "output": "same", "reference": r} for i, r in enumerate(refs)]
    student = [{"id": str(i), "output": "same"} for i in range(60)]
    out = compare(student, teacher, refs)
    assert "agreement_label" not in out and out["agreement_exact"] == 1.0
