"""quantize stage: the merged student -> INT8 / INT4 (GPTQ, AWQ) compressed-tensors dirs and GGUF files,
each reloaded by the engine that serves it and measured against the unquantized model.

Outputs (quantize/): int8/, gptq/, awq/ (HF dirs, compressed-tensors format: vLLM and transformers load
them), gguf/ (model-<TYPE>.gguf + Ollama Modelfile) and summary.json {artifact: {method, format, path,
size_bytes, perplexity, ppl_increase_pct, answer_perplexity (teacher answers given prompts),
answer_ppl_increase_pct, tokens_per_s, teacher_f1, gold_accuracy, ...}}; the
unquantized source is the "fp32" entry. Each artifact is written atomically and its verification kept in
work/, so an interrupted run resumes with the next artifact.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.quantize")

# method name -> module with quantize(...). Heavy libraries load only when a method runs.
METHODS: dict[str, str] = {
    "int8": "toolkit.quantize.int8",
    "gptq": "toolkit.quantize.gptq",
    "awq": "toolkit.quantize.awq",
    "gguf": "toolkit.quantize.gguf",
}

SUMMARY = "summary.json"


def run(ctx) -> dict:
    import importlib

    from toolkit.io import atomic_dir, atomic_write_json
    from toolkit.quantize.calibration import calibration_texts, eval_examples, load_examples
    from toolkit.quantize.verify import add_increases, build_probe, verify_hf

    cfg = ctx.config
    # --- setup: source model, calibration texts, the probe every artifact is measured on
    src = source_model(ctx)
    methods = [m for m in METHODS if getattr(cfg, m) is not None and getattr(cfg, m).enabled]
    if not methods:
        raise OptkitError("quantize: no method enabled; add one of int8, gptq, awq, gguf to the quantize section")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    examples = load_examples(ctx)
    texts = calibration_texts(examples, tok, cfg.calibration)
    held = eval_examples(examples, max(cfg.eval_samples, cfg.agreement_samples))
    probe = build_probe(held, tok, cfg.eval_samples, cfg.agreement_samples, cfg.calibration.max_length,
                        cfg.max_new_tokens)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    # Per-artifact results, so a resumed run skips finished artifacts; keyed by the source weights and the
    # settings, so a changed student or recipe never reuses a stale artifact.
    key = _source_key(src, cfg)
    done_dir = ctx.work_dir / "verified" / key
    done_dir.mkdir(parents=True, exist_ok=True)

    # --- run: baseline, then each method -> artifact -> verification
    summary = {"fp32": _cached(done_dir / "fp32.json", lambda: {
        "method": "none", "format": "hf", "path": None, **verify_hf(src, probe)})}
    base = summary["fp32"]
    for name in methods:
        mcfg = getattr(cfg, name)
        module = importlib.import_module(METHODS[name])
        if name == "gguf":
            summary.update(_gguf(ctx, module, src, mcfg, probe, threads, done_dir, base))
            continue
        out = ctx.dir / name

        def build_and_verify(name=name, mcfg=mcfg, module=module, out=out):
            started = time.perf_counter()
            with atomic_dir(out) as tmp:
                facts = module.quantize(src, tmp, mcfg, texts, cfg.calibration.max_length)
            seconds = round(time.perf_counter() - started, 1)
            return {**facts, "path": name, "quantize_seconds": seconds, **verify_hf(out, probe),
                    "calibration_samples": len(texts)}

        summary[name] = _cached(done_dir / f"{name}.json", build_and_verify, must_exist=out)
        add_increases(summary[name], base)

    # --- save
    atomic_write_json(ctx.dir / SUMMARY, summary)
    ctx.extra["quantize_source"] = str(src)
    metrics = _headline(summary)
    ctx.log_metrics(metrics)
    return metrics


def source_model(ctx) -> Path:
    """distill/model by default; quantize.model overrides. A model that is already quantized is refused."""
    from toolkit.models import resolve

    cfg = ctx.config
    if cfg.model:
        resolved = resolve(cfg.model)
        if not isinstance(resolved, Path):
            raise OptkitError(f"quantize.model: '{cfg.model}' must be a local model directory or a built-in name")
        src = resolved
        for f in [src / "config.json", *sorted(src.glob("*.safetensors"))]:  # changed weights re-run the stage
            if f.is_file():
                ctx.add_input(f)
    else:
        src = ctx.upstream("distill") / "model"
    if not (src / "config.json").is_file():
        raise OptkitError(f"quantize: {src} is not a model directory (no config.json)")
    qc = json.loads((src / "config.json").read_text()).get("quantization_config")
    if qc:
        kind = qc.get("quant_method") or qc.get("format") or "unknown"
        raise OptkitError(f"quantize: the model in {src} is already quantized ({kind}); quantize the "
                          "unquantized (merged) student instead, not an artifact of this stage")
    return src


def _source_key(src: Path, cfg) -> str:
    from toolkit.config import config_hash

    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir() if p.is_file())
    return config_hash({"weights": weights, "quantize": cfg.model_dump()})


def _gguf(ctx, module, src, mcfg, probe, threads, done_dir, base: dict) -> dict:
    from toolkit.io import atomic_dir, atomic_write_json
    from toolkit.quantize.verify import add_increases, verify_gguf

    out = ctx.dir / "gguf"
    files = {q: f"model-{q}.gguf" for q in mcfg.types}
    fresh = all((done_dir / f"gguf-{q}.json").is_file() and (out / f).is_file() for q, f in files.items())
    if not fresh:
        started = time.perf_counter()
        with atomic_dir(out) as tmp:
            facts = module.quantize(src, tmp, mcfg, done_dir, threads)
        seconds = round(time.perf_counter() - started, 1)
        atomic_write_json(done_dir / "gguf-facts.json", {**facts, "quantize_seconds_all_types": seconds})
    facts = json.loads((done_dir / "gguf-facts.json").read_text())
    entries = {}
    for qtype, fname in facts["files"].items():
        key = f"gguf-{qtype}"
        entry = _cached(done_dir / f"{key}.json", lambda fname=fname: {
            "method": "gguf", "format": "gguf", "type": qtype, "path": f"gguf/{fname}",
            "converter": facts["converter"], **verify_gguf(out / fname, probe, threads)}, must_exist=out / fname)
        entry["quantize_seconds_all_types"] = facts["quantize_seconds_all_types"]
        add_increases(entry, base)
        entries[key] = entry
    return entries


def _cached(path: Path, compute, must_exist: Path | None = None) -> dict:
    """A finished artifact's verification is reused on resume (if the artifact itself is still there)."""
    from toolkit.io import atomic_write_json

    if path.is_file() and (must_exist is None or must_exist.exists()):
        return json.loads(path.read_text())
    result = compute()
    atomic_write_json(path, result)
    return result


def _headline(summary: dict) -> dict:
    out = {"fp32_perplexity": summary["fp32"]["perplexity"]}
    for name, entry in summary.items():
        if name == "fp32":
            continue
        key = name.replace("-", "_")
        out[f"{key}_ppl_increase_pct"] = entry["ppl_increase_pct"]
        if "answer_ppl_increase_pct" in entry:
            out[f"{key}_answer_ppl_increase_pct"] = entry["answer_ppl_increase_pct"]
        out[f"{key}_size_mb"] = round(entry["size_bytes"] / 1e6, 2)
        if entry.get("tokens_per_s"):
            out[f"{key}_tokens_per_s"] = entry["tokens_per_s"]
    return out
