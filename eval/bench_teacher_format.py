"""Does the teacher fail to name a category because its answer was cut short, or because it never names one?

The quickstart teacher names no category in ~24% of its answers (collect.generation.max_new_tokens: 12), and the
students' label agreement there is ~0 (eval/bench_distill_curve.py). This re-asks the teacher those prompts
through the collect stage's own hf backend (same model, dtype, chat template, greedy) with a larger token budget
and counts how many answers then end on their own and how many name a category.

    python eval/bench_teacher_format.py [--collect artifacts/quickstart/collect] [--max-new-tokens 48]

Writes eval/results/bench_teacher_format.json and .md (with every re-generated answer in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collect", type=Path, default=REPO / "artifacts" / "quickstart" / "collect")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench_teacher_format")
    args = p.parse_args()

    from toolkit import runtime

    runtime.configure(threads=args.threads)
    from toolkit.collect.backends import make_backend, settings
    from toolkit.config import load_recipe
    from toolkit.metrics import first_label, label_set
    from toolkit.records import load_records

    records = load_records(args.collect)
    labels = label_set(r["reference"] for r in records)
    unlabeled = [r for r in records if first_label(r["output"], labels) is None]
    short_budget = load_recipe(args.recipe).collect.generation.max_new_tokens  # what the collect was run with
    recipe = load_recipe(args.recipe, [f"collect.generation.max_new_tokens={args.max_new_tokens}"])
    backend = make_backend("hf", recipe)
    backend.load()
    answers = []
    for i in range(0, len(unlabeled), recipe.collect.hf.batch_size):
        batch = unlabeled[i:i + recipe.collect.hf.batch_size]
        for r, new in zip(batch, backend.engine.run_batch([r["messages"] for r in batch], settings(recipe))[0]):
            named = first_label(new["output"], labels)
            answers.append({"id": r["id"], "reference": r["reference"], "short": r["output"],
                            "short_finish": r["finish_reason"], "long": new["output"],
                            "long_finish": new["finish_reason"], "named": named})
        print(f"{len(answers)}/{len(unlabeled)}", flush=True)

    def count(pred) -> int:
        return sum(1 for a in answers if pred(a))

    result = {
        "collect": str(args.collect), "answers": len(records), "unlabeled": len(unlabeled),
        "unlabeled_share": round(len(unlabeled) / len(records), 3),
        "short_budget": short_budget, "long_budget": args.max_new_tokens,
        "unlabeled_cut_at_short_budget": count(lambda a: a["short_finish"] == "length"),
        "long_ended_on_their_own": count(lambda a: a["long_finish"] == "stop"),
        "long_name_a_category": count(lambda a: a["named"] is not None),
        "long_name_the_right_category": count(lambda a: a["named"] == a["reference"]),
        "answers_detail": answers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    r = result
    args.out.with_suffix(".md").write_text(
        "# teacher answers that name no category: cut short, or never naming one?\n\n"
        f"Collect: `{args.collect.relative_to(REPO) if args.collect.is_relative_to(REPO) else args.collect}`, "
        f"{r['answers']} answers; {r['unlabeled']} ({r['unlabeled_share']:.0%}) name no category.\n\n"
        "| | count |\n|---|---|\n"
        f"| unlabeled answers that hit the {short_budget}-token budget | {r['unlabeled_cut_at_short_budget']} |\n"
        f"| re-asked with {args.max_new_tokens} tokens: ended on their own | {r['long_ended_on_their_own']} |\n"
        f"| re-asked with {args.max_new_tokens} tokens: name a category | {r['long_name_a_category']} |\n"
        f"| re-asked with {args.max_new_tokens} tokens: name the right one | {r['long_name_the_right_category']} |\n")
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
