"""GPU readiness check: optkit's GPU paths on CUDA, offline, timed, one JSON (run through eval/gpu_check.sh).

Steps (each: status ok / skipped (with the reason) / failed (with the error), wall time, tokens, tokens/s,
peak memory), all on SmolLM2-135M (the offline built-in, toolkit.models) and real Bitext rows from the repo:

  distill_lora    the distill stage's training (toolkit.distill.train.train: Trainer + its loss), LoRA, bf16
  distill_full    the same, full fine-tune, bf16
  distill_qlora   the same, QLoRA NF4 (needs bitsandbytes; skipped without it)
  quantize_gptq   the quantize stage's GPTQ W4A16 (toolkit.quantize registry, llm-compressor oneshot on the
                  GPU llm-compressor picks), then the artifact reloaded and scored (perplexity) on held-out rows

Tokens/s: training = steps * batch * mean example length / Trainer runtime (examples are cycled, so the mean
length is exact over an epoch, approximate inside one); GPTQ = calibration tokens / quantize wall time. Peak
memory: torch.cuda.max_memory_allocated over the step (reset before it); in --cpu mode the process's peak
RSS so far (ru_maxrss, never reset: an upper bound for the step).

Without CUDA this exits 2 unless --cpu, which runs every step on the CPU with tiny settings (a 2-block
pruned model, a few steps) to prove the script end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"  # in the repo: no download

# GPU settings vs the --cpu proof run (same code paths, smaller numbers).
SETTINGS = {
    "gpu": {"steps": 60, "batch": 16, "max_length": 256, "train_rows": 480, "cal": 128, "eval": 64, "layers": None},
    "cpu": {"steps": 3, "batch": 2, "max_length": 64, "train_rows": 8, "cal": 8, "eval": 4, "layers": [0, 29]},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_check.json"),
                    help="the JSON written (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF dir")
    ap.add_argument("--data", default=str(DATA), help="jsonl with instruction, category (, response)")
    ap.add_argument("--steps", nargs="+", default=["distill_lora", "distill_full", "distill_qlora", "quantize_gptq"],
                    help="which steps to run, in order")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temporary dir, deleted at the end)")
    ap.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                    help="no CUDA needed: tiny settings on the CPU, to prove the script works")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------- data and model


def bitext_rows(path: Path) -> list[dict]:
    """Rows with instruction, category and an answer: the file's response, or (the repo's extract has none)
    the intent and category as a short answer."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for r in rows:
        r.setdefault("response", f"This is about {r.get('intent', '').replace('_', ' ')} ({r['category']}).")
    return rows


def write_collect(rows: list[dict], collect: Path) -> Path:
    """A collect dir as the distill stage reads it: real prompts, the dataset's answers as teacher outputs."""
    collect.mkdir(parents=True, exist_ok=True)
    with open(collect / "outputs.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"id": str(r["id"]), "split": "train", "reference": r["category"],
                                 "messages": [{"role": "user", "content": r["instruction"]}],
                                 "output": r["response"], "finish_reason": "stop"}) + "\n")
    return collect


def student_dir(model: str, layers, work: Path) -> Path:
    """The model as an HF dir; in --cpu mode pruned to 2 blocks by the distill stage's own pruning."""
    from toolkit.models import resolve

    src = Path(resolve(model))
    if not layers:
        return src
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.distill.student import set_layers

    dst = work / "pruned"
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    set_layers(m, layers)
    m.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


# ----------------------------------------------------------------------------------------- measuring


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda allocated",
                "peak_rss_bytes": rss}
    return {"peak_memory_bytes": rss, "peak_memory_kind": "process peak RSS (CPU run)"}


def run_step(name: str, fn, *args) -> dict:
    reset_peak()
    start = time.perf_counter()
    try:
        facts = fn(*args)
    except Skip as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # a failed step is reported, and the next one still runs
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:], "wall_s": round(time.perf_counter() - start, 2)}
    return {"status": "ok", "wall_s": round(time.perf_counter() - start, 2), **facts, **peak_memory()}


class Skip(Exception):
    """A step that cannot run here (a missing optional package), with the reason."""


# ----------------------------------------------------------------------------------------- steps


def distill(method: str, ctx: dict) -> dict:
    import torch

    from toolkit.config.common import ModelSpec
    from toolkit.config.distill import KDConfig, LoraSettings, TrainConfig, TrainSpec
    from toolkit.distill.train import train

    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Skip("bitsandbytes is not installed (pass its wheel with gpu_check.sh --wheels DIR)") from None
        if not torch.cuda.is_available():
            raise Skip("QLoRA needs CUDA (toolkit.distill.train.check_method)")
    s = ctx["s"]
    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    spec = TrainSpec(student_dir=str(ctx["student"]), collect_dir=str(ctx["collect"]),
                     work_dir=str(ctx["work"] / f"distill_{method}"), method=method, lora=LoraSettings(),
                     kd=KDConfig(), chat_template=True, teacher=ModelSpec(model=str(ctx["student"])),
                     training=TrainConfig(max_steps=s["steps"], batch_size=s["batch"], max_length=s["max_length"],
                                          learning_rate=2e-4 if method != "full" else 2e-5, logging_steps=10,
                                          save_steps=10_000, seed=0, bf16=bf16))
    facts = train(spec)
    runtime = facts.get("train_runtime_s") or 0.0
    tokens = facts["global_step"] * s["batch"] * ctx["mean_len"]
    return {"method": method, "bf16": bf16, "steps": facts["global_step"], "batch_size": s["batch"],
            "train_loss": facts.get("train_loss"), "train_runtime_s": runtime, "tokens": int(tokens),
            "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            # toolkit.distill.train turns cuDNN attention off for training on CUDA (NaN backward, torch#196678)
            "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled()}


def quantize_gptq(ctx: dict) -> dict:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        raise Skip("llm-compressor is not installed (pass its wheels with gpu_check.sh --wheels DIR)") from None
    from transformers import AutoTokenizer

    from toolkit.engines.render import Renderer
    from toolkit.quantize.calibration import Example, calibration_texts, eval_examples
    from toolkit.quantize.dtype import parameter_count
    from toolkit.quantize.method import Job
    from toolkit.quantize.registry import METHODS
    from toolkit.quantize.verify import add_increases, build_probe, verify_hf
    from toolkit.config import CalibrationConfig

    s, src = ctx["s"], ctx["student"]
    renderer = Renderer(AutoTokenizer.from_pretrained(src), chat_template=True)
    rows = ctx["rows"]
    examples = ([Example(str(r["id"]), "train", [{"role": "user", "content": r["instruction"]}], r["category"],
                         r["response"]) for r in rows[:s["cal"]]] +
                [Example(str(r["id"]), "test", [{"role": "user", "content": r["instruction"]}], r["category"],
                         r["response"]) for r in rows[-s["eval"]:]])
    cal = CalibrationConfig(num_samples=s["cal"], min_samples=1, max_length=s["max_length"])
    texts = calibration_texts(examples, renderer, cal)
    cal_tokens = sum(min(len(renderer.tok(t, add_special_tokens=False)["input_ids"]), s["max_length"]) for t in texts)
    config_cls, run = METHODS["gptq"]
    out = ctx["work"] / "gptq"
    start = time.perf_counter()
    run(config_cls(group_size=32, symmetric=False, act_order=True),
        Job(src=src, out=out, work=ctx["work"] / "gptq-work", children=ctx["work"] / "children", texts=texts,
            max_length=s["max_length"], threads=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))
    seconds = time.perf_counter() - start
    facts = peak_memory()  # of the quantization itself, before the CPU check below
    held = eval_examples(examples, s["eval"], examples[:s["cal"]], splits=("test",))
    probe = build_probe(held, renderer, len(held), 0, s["max_length"], 8, parameter_count(src))
    base, quant = verify_hf(src, probe), verify_hf(out, probe)  # transformers on the CPU, as the stage verifies
    add_increases(quant, base)
    return {"scheme": "W4A16 g32 asym act-order", "quantize_s": round(seconds, 2), "tokens": cal_tokens,
            "tokens_per_s": round(cal_tokens / seconds, 1), "size_bytes": quant["size_bytes"],
            "bits_per_weight": quant["bits_per_weight"], "perplexity": quant["perplexity"],
            "ppl_increase_pct": quant.get("ppl_increase_pct"), **facts}


STEPS = {"distill_lora": lambda ctx: distill("lora", ctx), "distill_full": lambda ctx: distill("full", ctx),
         "distill_qlora": lambda ctx: distill("qlora", ctx), "quantize_gptq": quantize_gptq}


# ----------------------------------------------------------------------------------------- main


def environment() -> dict:
    import importlib.metadata as md

    import torch

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(),
           "packages": {p: version(p) for p in ("transformers", "peft", "accelerate", "llmcompressor",
                                                "compressed-tensors", "bitsandbytes", "datasets")}}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                   device_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        print(f"error: unknown steps {unknown}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("error: no CUDA device visible to torch (torch.cuda.is_available() is False); this check is for a "
              "GPU machine. Use --cpu (--dry-run) to prove the script on a CPU with tiny settings.", file=sys.stderr)
        return 2
    from toolkit import runtime

    runtime.configure(offline=True)
    s = SETTINGS["cpu" if args.cpu else "gpu"]
    report = {"mode": "cpu dry run" if args.cpu else "gpu", "settings": s, "environment": environment(), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=args.work) as tmp:
        work = Path(tmp)
        rows = bitext_rows(Path(args.data))
        student = student_dir(args.model, s["layers"], work)
        ctx = {"s": s, "work": work, "rows": rows, "student": student,
               "collect": write_collect(rows[:s["train_rows"]], work / "collect"),
               "mean_len": mean_example_length(student, rows[:s["train_rows"]], s["max_length"])}
        started = time.perf_counter()
        for name in args.steps:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            report["steps"][name] = result = run_step(name, STEPS[name], ctx)
            print(f"gpu_check: {name} {result['status']} {result.get('wall_s', '')}s "
                  f"{result.get('reason') or result.get('error') or ''}", file=sys.stderr, flush=True)
            write(report, Path(args.out))  # after every step: a run cut short keeps what it measured
        report["wall_s"] = round(time.perf_counter() - started, 1)
    write(report, Path(args.out))
    failed = [n for n, r in report["steps"].items() if r["status"] == "failed"]
    print(f"gpu_check: wrote {args.out}; failed: {', '.join(failed) or 'none'}", file=sys.stderr)
    return 1 if failed else 0


def mean_example_length(student: Path, rows: list[dict], max_length: int) -> float:
    """Mean tokens per training example, built as the distill stage builds them."""
    from transformers import AutoTokenizer

    from toolkit.distill.data import build_examples

    records = [{"id": str(r["id"]), "messages": [{"role": "user", "content": r["instruction"]}],
                "output": r["response"], "finish_reason": "stop"} for r in rows]
    examples, _ = build_examples(records, AutoTokenizer.from_pretrained(student), max_length)
    return sum(len(e["input_ids"]) for e in examples) / len(examples)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
