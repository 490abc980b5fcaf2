"""Training throughput: the distill stage's trainer vs a plain transformers Trainer loop, same data, same run.

Both train the same student (SmolLM2-135M-Instruct pruned to --layers layers, first+last split) on the same
teacher records with the same batch size, method, optimizer and number of steps; runs alternate (A B A B …)
so machine load hits both alike. Printed: median samples/s and tokens/s per variant and the ratio ours/plain.

The plain loop is what a user would write by hand: right-padded batches, `model(labels=...)` (the LM head
over every position). Ours: left-padded batches, LM head only over the completion window, the prompt head all
rows share computed once per batch (ours_unshared: without that), optional KD.

    python eval/bench_distill.py [--collect-dir artifacts/quickstart/collect] [--steps 12] [--repeats 3]

Writes eval/results/bench_distill.json and .md. Timings on a shared machine are noisy: compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_records(collect_dir: Path | None) -> tuple[list[dict], str]:
    from toolkit.records import load_records as load

    if collect_dir and (collect_dir / "outputs.jsonl").is_file():
        return load(collect_dir, ["train"]), str(collect_dir)
    # No collect run yet: the quickstart extract with the gold category as the "teacher output".
    sys.path.insert(0, str(REPO / "tests"))
    from tests.distill.helpers import bitext_rows, make_records

    recs = [r for r in make_records(bitext_rows(400)) if r["split"] == "train"]
    return recs, "bitext quickstart extract (gold category as output)"


def plain_collate(pad_id: int):
    import torch

    def collate(batch):
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def run_variant(name: str, base: Path, examples: list[dict], tok, args) -> dict:
    from transformers import Trainer, TrainingArguments

    from toolkit.distill.data import LeftPadCollator
    from toolkit.distill.train import ListDataset, load_student_for_training, make_trainer_class

    from toolkit.config import LoraSettings

    model = load_student_for_training(str(base), args.method, LoraSettings(dropout=0.0), bf16=False)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                  learning_rate=2e-4, save_strategy="no", report_to="none", use_cpu=True,
                                  disable_tqdm=True, logging_steps=10_000, seed=0, data_seed=0,
                                  dataloader_num_workers=0, remove_unused_columns=False)
        data = ListDataset(examples)
        if name.startswith("ours"):  # ours_unshared: every row's whole prompt, no shared prefix
            collator = LeftPadCollator(tok.pad_token_id, False, share_prefix=name == "ours")
            trainer = make_trainer_class()(model=model, args=targs, train_dataset=data, data_collator=collator)
        else:
            trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=plain_collate(tok.pad_token_id))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    samples = args.steps * args.batch_size
    tokens = sum(len(examples[i % len(examples)]["input_ids"]) for i in range(samples))  # approx.: sampler shuffles
    return {"seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collect-dir", type=Path, default=REPO / "artifacts" / "quickstart" / "collect")
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench_distill")
    args = p.parse_args()

    from toolkit import runtime

    runtime.configure(threads=args.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.distill.data import build_examples
    from toolkit.distill.student import first_last, pruned_copy
    from toolkit.models import resolve

    teacher_dir = resolve("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    records, source = load_records(args.collect_dir)
    examples, _ = build_examples(records, tok, 256)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        pruned_copy(teacher, first_last(len(teacher.model.layers), args.layers)).save_pretrained(base)
        tok.save_pretrained(base)
        del teacher
        names = ["ours", "ours_unshared", "plain"]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for name in names[rep % 3:] + names[:rep % 3]:  # rotated: none always first or last
                r = run_variant(name, base, examples, tok, args)
                runs[name].append(r)
                print(f"repeat {rep} {name:5s} {r['samples_per_s']:.2f} samples/s ({r['seconds']:.1f} s)", flush=True)
    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    result = {"what": "distill training throughput, ours vs plain transformers Trainer",
              "data": source, "examples": len(examples), "layers": args.layers, "method": args.method,
              "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": args.threads, "torch": torch.__version__, "median_samples_per_s": med,
              "ratio_ours_over_plain": med["ours"] / med["plain"],
              "ratio_shared_prefix_over_unshared": med["ours"] / med["ours_unshared"], "runs": runs,
              "note": "shared 2-core CPU machine, other jobs running: absolute numbers are noisy, the ratio less so"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        "# distill training throughput\n\n"
        f"Student: SmolLM2-135M pruned to {args.layers} layers, {args.method}, batch {args.batch_size}, "
        f"{args.steps} steps x {args.repeats} repeats (alternating), {args.threads} threads. Data: {source}.\n\n"
        "| variant | median samples/s |\n|---|---|\n"
        f"| optkit distill trainer | {med['ours']:.2f} |\n"
        f"| optkit distill trainer, no shared prefix (every row's whole prompt) | {med['ours_unshared']:.2f} |\n"
        f"| plain transformers Trainer | {med['plain']:.2f} |\n\n"
        f"Ratio ours / plain: **{med['ours'] / med['plain']:.2f}** (target: >= 0.9); shared prefix / none: "
        f"**{med['ours'] / med['ours_unshared']:.2f}**.\n")
    print(f"median samples/s: ours {med['ours']:.2f}, unshared {med['ours_unshared']:.2f}, plain {med['plain']:.2f}, "
          f"ratio {med['ours'] / med['plain']:.2f}, shared/unshared {med['ours'] / med['ours_unshared']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
