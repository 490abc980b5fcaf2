"""In-stage evaluation: student vs teacher on held-out prompts.

- NLL of the teacher's outputs under each model (how well the student models the teacher).
- Agreement of the student's greedy answer with the teacher's: exact match, token F1, ROUGE-L, and, when the
  references form a label set (<= 50 distinct values), agreement_label: both name the same first label
  (toolkit.metrics.label_agreement) -- the decision, not the phrasing, which is what a classifier is for.
- Gold accuracy of both, where the data has references: the label set is the distinct references, and an
  answer counts when the first label it names is the gold one (toolkit.metrics.gold_match).
"""

from __future__ import annotations

from statistics import mean

from toolkit import metrics
from toolkit.distill.data import batches, build_examples


def generate(model, tok, prompts: list[dict], gen, chat_template: bool, batch_size: int = 8,
             on_batch=None) -> list[dict]:
    """Greedy generations for every prompt (id, split, output, output_tokens, latency_s) through the hf engine.
    `gen` = the recipe's collect.generation, so student and teacher answer under the same settings."""
    from toolkit.engines import HFEngine, Settings

    engine = HFEngine(model, tok, chat_template=chat_template, ref="the student")
    settings = Settings.of(gen, temperature=0.0, top_p=1.0)  # greedy: the comparison must not depend on a seed
    rows = engine.generate([p["messages"] for p in prompts], settings, batch_size,
                           on_result=(lambda i, row: on_batch(1)) if on_batch else None)
    return [{"id": p["id"], "split": p["split"], "output": row["output"].strip(), "output_tokens": row["output_tokens"],
             "latency_s": round(row["latency_s"], 4)} for p, row in zip(prompts, rows)]


def nll_of_teacher_outputs(model, tok, records: list[dict], max_length: int, chat_template: bool,
                           batch_size: int = 8) -> float:
    from toolkit.engines.hf import completion_nll

    examples, _ = build_examples(records, tok, max_length, 1, chat_template, what="evaluation")
    return completion_nll(model, batches(examples, tok.pad_token_id, batch_size))


def agreement(student: dict[str, str], teacher: dict[str, str], labels: list[str] | None = None) -> dict:
    ids = [i for i in teacher if i in student]
    if not ids:
        return {}
    out = {"agreement_exact": mean(metrics.exact_match(student[i], teacher[i]) for i in ids),
           "agreement_f1": mean(metrics.token_f1(student[i], teacher[i]) for i in ids),
           "agreement_rouge_l": mean(metrics.rouge_l(student[i], teacher[i]) for i in ids),
           "n": len(ids)}
    if labels:
        out["agreement_label"] = mean(metrics.label_agreement(student[i], teacher[i], labels) for i in ids)
    return out


def gold_accuracy(answers: dict[str, str], references: dict[str, str], labels: list[str]) -> float | None:
    ids = [i for i in answers if references.get(i)]
    if not ids:
        return None
    return mean(metrics.gold_match(answers[i], references[i], labels) for i in ids)


def compare(student_rows: list[dict], teacher_records: list[dict], label_refs: list[str]) -> dict:
    """Agreement and gold accuracy of student vs teacher over the teacher records given."""
    student = {r["id"]: r["output"] for r in student_rows}
    teacher = {r["id"]: r["output"] for r in teacher_records}
    refs = {r["id"]: r.get("reference") for r in teacher_records if r.get("reference")}
    labels = sorted({str(x) for x in label_refs if x})
    out = agreement(student, teacher, metrics.label_set(label_refs))
    st_gold = gold_accuracy({i: student[i] for i in teacher if i in student}, refs, labels)
    te_gold = gold_accuracy(teacher, refs, labels)
    if st_gold is not None and te_gold is not None:
        out.update(student_gold_accuracy=st_gold, teacher_gold_accuracy=te_gold,
                   gold_ratio=(st_gold / te_gold) if te_gold > 0 else None)
    return out
