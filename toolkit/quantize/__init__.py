"""quantize stage: the merged student -> INT8 / INT4 (GPTQ, AWQ) compressed-tensors dirs and GGUF files,
each reloaded by the engine that serves it and measured against the unquantized model.

Outputs (quantize/): int8/, gptq/, awq/ (HF dirs, compressed-tensors format: vLLM and transformers load
them), gguf/ (model-<TYPE>.gguf + Ollama Modelfile) and summary.json {artifact: {method, format, path,
size_bytes, perplexity, ppl_increase_pct, answer_perplexity (teacher answers given prompts),
answer_ppl_increase_pct, tokens_per_s, teacher_f1, gold_accuracy, ...}}; the
unquantized source is the "fp32" entry. Every entry also has bits_per_weight (size over the source's
parameter count). Calibration and scoring never share a prompt (toolkit.quantize.calibration). Each artifact
is written atomically and its verification kept in work/, so an interrupted run resumes with the next artifact.

Flow: prepare (reap what a killed run left, source, calibration texts, probe) -> for each enabled method of
the registry (toolkit.quantize.registry.METHODS, GGUF included): quantize once -> verify each artifact -> save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The recipe schema first: it imports this package's registry, whose methods import toolkit.config.base; loaded
# in this order, no module sees a half-initialised other one, whichever of the two is imported first.
import toolkit.config  # noqa: F401  (import order, see above)
from toolkit.errors import OptkitError
from toolkit.quantize.method import Job
from toolkit.quantize.registry import METHODS

log = logging.getLogger("optkit.quantize")

SUMMARY = "summary.json"
CHILDREN = "children"  # under work/: records of running child processes (toolkit.procs)

# Recipe keys besides `quantize` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: the distilled student; calibration prompts from collect, or from `data` without a collect stage.
READS = ("collect", "distill", "data", "seed")


@dataclass
class Setup:
    """What every method run and every verification share."""

    src: Path
    texts: list[str]
    probe: object
    threads: int
    done: Path  # work/verified/<source and settings key>/: per-method run records and per-artifact results


def run(ctx) -> dict:
    setup = prepare(ctx)
    summary = {"fp32": _cached(setup.done / "fp32.json", lambda: {
        "method": "none", "format": "hf", "path": None, **_verify(setup.src, "hf", setup)})}
    for name, mcfg in enabled_methods(ctx.config):
        record = quantize_once(ctx, setup, name, mcfg)
        summary.update(verify_artifacts(ctx, setup, name, record, base=summary["fp32"]))
    return save(ctx, setup, summary)


def enabled_methods(cfg) -> list[tuple[str, object]]:
    methods = cfg.enabled_methods()
    if not methods:  # the recipe refuses this already (toolkit.config.recipe); a config built in code may not
        raise OptkitError(f"quantize: no method enabled; add one of {', '.join(METHODS)} to the quantize section")
    return methods


def prepare(ctx) -> Setup:
    """Reap what an interrupted run left, then: source model, calibration texts, the probe every artifact is
    measured on."""
    from transformers import AutoTokenizer

    from toolkit.quantize.calibration import (calibration_examples, calibration_texts, eval_examples, load_examples,
                                              renderer_for)
    from toolkit.quantize.dtype import parameter_count
    from toolkit.quantize.verify import build_probe

    cfg = ctx.config
    clean_stale(ctx)
    enabled_methods(cfg)  # fail before loading anything
    src = source_model(ctx)
    tok = renderer_for(ctx, AutoTokenizer.from_pretrained(src))  # the one rendering (toolkit.engines)
    examples = load_examples(ctx)
    texts = calibration_texts(examples, tok, cfg.calibration)
    held = eval_examples(examples, max(cfg.eval_samples, cfg.agreement_samples),
                         calibration_examples(examples, cfg.calibration))
    probe = build_probe(held, tok, cfg.eval_samples, cfg.agreement_samples, cfg.calibration.max_length,
                        cfg.max_new_tokens, params=parameter_count(src))
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    # Keyed by the source weights, the settings, the calibration texts and what every artifact is scored on, so a
    # changed student, recipe or data split never reuses a stale artifact or score. Other keys' folders go: they
    # hold an F16 GGUF each and the artifacts they describe have been rebuilt since.
    key = _source_key(src, cfg, texts, probe)
    done = ctx.work_dir / "verified" / key
    for old in (ctx.work_dir / "verified").glob("*"):
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    done.mkdir(parents=True, exist_ok=True)
    return Setup(src, texts, probe, threads, done)


def clean_stale(ctx) -> None:
    """After a kill -9: kill child processes still running for the dead run and delete their temporaries, and
    the half-built method directories atomic_dir leaves (quantize/.<method>.tmp-*). The pipeline's run lock
    means nothing else writes here now."""
    from toolkit import procs

    procs.reap_stale(ctx.work_dir / CHILDREN)
    for name in METHODS:
        for stale in [*ctx.dir.glob(f".{name}.tmp-*"), *ctx.dir.glob(f".{name}.old-*")]:
            log.warning("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def quantize_once(ctx, setup: Setup, name: str, mcfg) -> dict:
    """Run the method into quantize/<name>/ unless a finished run of it (same source and settings) is there.
    Returns its record: {quantize_seconds, artifacts: [Artifact as dict]}."""
    from toolkit.io import atomic_dir, atomic_write_json, atomic_write_text

    record_file, out = setup.done / f"{name}.run.json", ctx.dir / name
    # quantize/<name>/ is shared by every key: reuse it only if this key built it (settings A -> B -> A rebuilds)
    built_by = ctx.work_dir / "built" / f"{name}.key"
    if record_file.is_file() and out.exists() and built_by.is_file() and built_by.read_text() == setup.done.name:
        return json.loads(record_file.read_text())
    _config_cls, run_method = METHODS[name]
    built_by.unlink(missing_ok=True)
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        job = Job(src=setup.src, out=tmp, work=setup.done / name, children=ctx.work_dir / CHILDREN,
                  texts=setup.texts, max_length=ctx.config.calibration.max_length, threads=setup.threads,
                  unquantized_dtype=ctx.config.unquantized_dtype, chat_template=ctx.recipe.data.chat_template)
        artifacts = run_method(mcfg, job)
    record = {"quantize_seconds": round(time.perf_counter() - started, 1),
              "artifacts": [asdict(a) for a in artifacts]}
    for a in artifacts:  # new files: an earlier verification of the same name no longer applies
        (setup.done / f"{a.name}.json").unlink(missing_ok=True)
    atomic_write_json(record_file, record)
    built_by.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(built_by, setup.done.name)
    return record


def verify_artifacts(ctx, setup: Setup, name: str, record: dict, base: dict) -> dict[str, dict]:
    """Reload each artifact with the engine that serves it; summary entries by artifact name."""
    from toolkit.quantize.verify import add_increases

    entries = {}
    for art in record["artifacts"]:
        path = f"{name}/{art['file']}" if art["file"] else name
        entry = _cached(setup.done / f"{art['name']}.json", lambda art=art, path=path: {
            "method": name, "format": art["format"], **art["facts"], "path": path,
            "quantize_seconds": record["quantize_seconds"],
            **_verify(ctx.dir / path, art["format"], setup)}, must_exist=ctx.dir / path)
        add_increases(entry, base)
        entries[art["name"]] = entry
    return entries


def save(ctx, setup: Setup, summary: dict) -> dict:
    from toolkit.io import atomic_write_json

    atomic_write_json(ctx.dir / SUMMARY, summary)
    ctx.extra["quantize_source"] = str(setup.src)
    metrics = _headline(summary)
    ctx.log_metrics(metrics)
    return metrics


def _verify(path: Path, fmt: str, setup: Setup) -> dict:
    """The one place that maps an artifact format to the engine that verifies it."""
    from toolkit.quantize.verify import verify_gguf, verify_hf

    if fmt == "gguf":
        return verify_gguf(path, setup.probe, setup.threads)
    return verify_hf(path, setup.probe)  # the unquantized source ("hf") and compressed-tensors dirs


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


def _source_key(src: Path, cfg, texts: list[str], probe) -> str:
    from toolkit.config import config_hash

    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir() if p.is_file())
    scored_on = {k: getattr(probe, k) for k in ("eval_ids", "answer_starts", "prompts", "teacher", "gold", "labels",
                                                 "max_new_tokens")}
    return config_hash({"weights": weights, "quantize": cfg.model_dump(), "calibration": texts, "probe": scored_on})


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
        out[f"{key}_ppl_increase_pct"] = entry.get("ppl_increase_pct")  # None: no perplexity (a broken artifact)
        if "answer_ppl_increase_pct" in entry:
            out[f"{key}_answer_ppl_increase_pct"] = entry["answer_ppl_increase_pct"]
        out[f"{key}_size_mb"] = round(entry["size_bytes"] / 1e6, 2)
        if entry.get("bits_per_weight"):
            out[f"{key}_bits_per_weight"] = entry["bits_per_weight"]
        if entry.get("tokens_per_s"):
            out[f"{key}_tokens_per_s"] = entry["tokens_per_s"]
    return out
