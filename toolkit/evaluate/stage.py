"""The evaluate stage, top to bottom: held-out prompts -> each variant (answers, quality, latency, throughput,
perplexity, judge, cost) -> the composed system replay -> Pareto set -> tables, plots, report.md -> MLflow
(one nested run per variant).

Each variant's result is kept under work/ keyed by everything that decides it, so an interrupted evaluation
resumes at the next variant instead of starting over.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from toolkit.config import config_hash
from toolkit.errors import OptkitError
from toolkit.evaluate import measure
from toolkit.evaluate.variants import Variant, discover, select
from toolkit.io import atomic_write_json, read_jsonl, write_jsonl
from toolkit.models import dtype_name

log = logging.getLogger("optkit.evaluate")


# ------------------------------------------------------------------------------------------ setup


def eval_records(ctx) -> list[dict]:
    from toolkit.records import load_records

    cfg = ctx.config
    records = sorted(load_records(ctx.upstream("collect"), [cfg.split]), key=lambda r: r["id"])
    if not records:
        raise OptkitError(f"evaluate.split: collect has no '{cfg.split}' records (collect.splits must include it)")
    return records[:cfg.max_samples] if cfg.max_samples else records


def upstream_fingerprints(ctx) -> dict:
    from toolkit.pipeline import read_manifest

    return {s: (read_manifest(ctx.run_dir / s) or {}).get("fingerprint")
            for s in ("collect", "distill", "quantize", "route", "cache") if getattr(ctx.recipe, s) is not None}


def make_engine(ctx, v: Variant, max_new_tokens: int):
    recipe = ctx.recipe
    gen = recipe.collect.generation if recipe.collect else None
    common = {"chat_template": recipe.data.chat_template, "max_new_tokens": max_new_tokens,
              "stop": list(gen.stop) if gen else []}
    if v.engine == "llama.cpp":
        from toolkit.evaluate.engines import LlamaCppEngine

        return LlamaCppEngine(v.gguf, seed=recipe.seed, tokenizer_dir=v.tokenizer_dir, **common)
    from toolkit.evaluate.engines import HFEngine, VLLMEngine

    trust = (recipe.teacher.trust_remote_code if v.source == "teacher" else
             bool(recipe.distill and recipe.distill.student.trust_remote_code))
    dtype = variant_dtype(ctx, v)
    if use_vllm(ctx.config.engine):
        return VLLMEngine(v.model_dir, adapter_dir=v.adapter_dir, dtype=dtype, trust_remote_code=trust,
                          seed=recipe.seed, **common)
    return HFEngine(v.model_dir, adapter_dir=v.adapter_dir, dtype=dtype, trust_remote_code=trust, **common)


def student_dtype(ctx) -> str:
    """evaluate.student_dtype, else the precision distill answered at (distill.eval_dtype)."""
    if ctx.config.student_dtype is not None:
        return ctx.config.student_dtype
    return ctx.recipe.distill.eval_dtype if ctx.recipe.distill is not None else "auto"


def variant_dtype(ctx, v: Variant) -> str:
    """The teacher at teacher.dtype (collect's answers are at that precision); every student variant (merged,
    LoRA, HF-format quantized) at student_dtype(ctx), so the student is scored at one precision throughout."""
    return ctx.recipe.teacher.dtype if v.source == "teacher" else student_dtype(ctx)


def serving_wanted(ctx, v: Variant) -> bool:
    """Serve a variant for the sweep when a serving engine is chosen (or, with auto, a vLLM environment exists)
    and its cost depends on throughput (self-hosted price, or none); API-priced variants are billed per token."""
    from toolkit.engines.servers import vllm_python

    if ctx.config.engine == "transformers" or (ctx.config.engine == "auto" and vllm_python() is None):
        return False
    price = measure.find_price(ctx.recipe.pricing, v.price_keys)[1]
    return price is None or price.per_hour is not None


def early_servers(ctx, variants: list[Variant]) -> dict:
    """{variant name: its model server, launched} when evaluate.server_start says early (auto: every server runs
    on the CPU, where side-by-side servers only share host memory); {} otherwise."""
    from toolkit.engines.servers import on_cpu, vllm_python
    from toolkit.evaluate.serving import server_for

    if ctx.config.server_start == "in_turn":
        return {}
    wanted = {v.name: server_for(v, ctx.config) for v in variants if serving_wanted(ctx, v)}
    wanted = {name: s for name, s in wanted.items() if s is not None}
    if not wanted:
        return {}
    if ctx.config.server_start == "auto" and any(s.kind == "vllm" for s in wanted.values()):
        python = vllm_python()
        if python is None or not on_cpu(python):
            return {}
    for server in wanted.values():
        server.launch()
    log.info("evaluate: started %d model server(s) in the background (evaluate.server_start)", len(wanted))
    return wanted


def use_vllm(choice: str) -> bool:
    import importlib.util

    if choice == "transformers":
        return False
    # In-process vLLM (answers, perplexity) only where vllm is importable here (the GPU extra); the served sweep
    # finds its own environment (toolkit.engines.servers.vllm_python).
    return importlib.util.find_spec("vllm") is not None


def known_answers(ctx, v: Variant, records: list[dict]) -> Optional[list[dict]]:
    """Answers that already exist and are exactly what generation would give: the teacher's own (collect) and the
    merged student's (distill/student_outputs.jsonl, same generation settings, at distill.eval_dtype), unless
    max_new_tokens or the student's precision (evaluate.student_dtype) differ."""
    if v.source == "teacher":
        return [{"output": r["output"], "output_tokens": r.get("output_tokens"), "input_tokens": r.get("input_tokens")}
                for r in records]
    distill = ctx.recipe.distill
    if (v.name == "student" and ctx.config.max_new_tokens is None and distill is not None
            and dtype_name(student_dtype(ctx)) == dtype_name(distill.eval_dtype)):
        path = ctx.upstream("distill") / "student_outputs.jsonl"
        if path.is_file():
            by_id = {r["id"]: r for r in read_jsonl(path)}
            if all(r["id"] in by_id for r in records):
                teacher_in = {r["id"]: r.get("input_tokens") for r in records}
                return [{"output": by_id[r["id"]]["output"], "output_tokens": by_id[r["id"]].get("output_tokens"),
                         "input_tokens": teacher_in[r["id"]]} for r in records]
    return None


# ------------------------------------------------------------------------------------------ one variant


def untimed_answers(ctx, v: Variant, records: list[dict], max_new: int) -> Optional[list[dict]]:
    """The variant's answers to every record (known ones, else generated in-process), nothing timed: the work
    that model servers started early overlap."""
    if v.engine == "records":
        return None
    answers = known_answers(ctx, v, records)
    if answers is None:
        engine = make_engine(ctx, v, max_new)
        try:
            answers = answer_all(ctx, engine, v, records)
        finally:
            engine.close()
    return answers


def answer_batch_size(ctx) -> int:
    """evaluate.answer_batch_size, else the batch the student answered in (distill.eval_batch_size)."""
    cfg, distill = ctx.config, ctx.recipe.distill
    return cfg.answer_batch_size or (distill.eval_batch_size if distill is not None else max(cfg.batch_sizes))


def answer_all(ctx, engine, v: Variant, records: list[dict]) -> list[dict]:
    with ctx.progress(f"{v.name}: answering", None):
        return engine.generate([r["messages"] for r in records], batch_size=answer_batch_size(ctx))


def evaluate_variant(ctx, v: Variant, records: list[dict], labels, max_new: int, judge,
                     answers: Optional[list[dict]] = None, server=None) -> tuple[dict, list[dict]]:
    """One variant's row and scored answers. `answers`: from untimed_answers, when servers started early;
    `server`: its model server, already launched (serving.serve_variant waits for it and stops it)."""
    cfg = ctx.config
    msgs = [r["messages"] for r in records]
    row: dict = {"variant": v.name, "source": v.source, "engine": v.engine, "size_bytes": v.facts.get("size_bytes"),
                 "quality_metric": cfg.metric, **{k: v.facts[k] for k in ("method", "format") if v.facts.get(k)}}
    if v.engine == "records":
        answers = known_answers(ctx, v, records)
        row.update(measure.records_latency(records))
    else:
        engine = make_engine(ctx, v, max_new)
        try:
            answers = answers or known_answers(ctx, v, records) or answer_all(ctx, engine, v, records)
            timed = msgs[:cfg.latency_samples]
            runs = measure.timed_requests(engine, timed, cfg.warmup)
            row.update(measure.latency_summary(runs))
            row.update(measure.batch_movement(engine, timed, answers[:len(timed)], runs))
            row.update(measure.measure_throughput(engine, timed, cfg.batch_sizes))
            if cfg.perplexity:
                row["perplexity"] = engine.perplexity([(r["messages"], r["output"]) for r in records])
            row["memory_bytes"] = engine.memory_bytes()
            if v.engine == "transformers":
                row["dtype"] = dtype_name(variant_dtype(ctx, v))
            renderer = engine.engine.renderer
        finally:
            engine.close()
        row["engine"] = engine.name
        if serving_wanted(ctx, v):
            from toolkit.evaluate.serving import apply_serving, serve_variant

            with ctx.progress(f"{v.name}: serving sweep", None):
                served = serve_variant(v, cfg, renderer, engine.settings, timed, answer_prompts=timed,
                                       server=server)
            apply_serving(row, served, answers[:len(timed)])
    scored = measure.score_rows(answers, records, cfg.metric, labels)
    row.update(measure.quality_summary(scored))
    if judge is not None:
        from toolkit.evaluate.judge import judge_variant

        row.update(judge_variant(judge, scored, records, cfg.judge.against, cfg.judge.max_samples))
    key, price = measure.find_price(ctx.recipe.pricing, v.price_keys)
    row.update(measure.variant_cost(row, price, key, scored, cfg.prompt_cache_fraction, cfg.slo))
    row["price_key"] = key
    return row, scored


def measurement_path(ctx, v: Variant, records, max_new, fps: dict) -> Path:
    """Where a variant's finished measurement is kept, keyed by everything it depends on."""
    cfg = ctx.config
    # Paths inside the run are keyed relative to it: a moved or copied run directory still resumes.
    def rel(x):
        if not isinstance(x, str):
            return x
        for prefix in (str(ctx.run_dir.resolve()), str(ctx.run_dir)):
            x = x.replace(prefix, "<run>")
        return x

    descriptor = {k: rel(x) for k, x in v.descriptor().items()}
    key = config_hash({"variant": descriptor, "evaluate": cfg.model_dump(), "max_new": max_new,
                       "ids": [r["id"] for r in records], "upstream": fps,
                       "pricing": {k: p.model_dump() for k, p in ctx.recipe.pricing.items()}})
    return ctx.work_dir / f"variant-{v.name}-{key}.json"


def cached_variant(ctx, v: Variant, records, labels, max_new, judge, fps: dict, answers=None, server=None
                   ) -> tuple[dict, list[dict]]:
    path = measurement_path(ctx, v, records, max_new, fps)
    if path.is_file():
        saved = json.loads(path.read_text())
        log.info("evaluate: %s: reusing the finished measurement in %s", v.name, path.name)
        return saved["row"], saved["scored"]
    log.info("evaluate: %s (%s)", v.name, v.engine)
    row, scored = evaluate_variant(ctx, v, records, labels, max_new, judge, answers, server)
    if not row.get("serving_error"):  # a server that failed to start (memory, a missing kernel) is tried again
        atomic_write_json(path, {"row": row, "scored": scored})
    return row, scored


# ------------------------------------------------------------------------------------------ the stage


def evaluate(ctx) -> dict:
    cfg, recipe = ctx.config, ctx.recipe
    records = eval_records(ctx)
    # The label set comes from every split: a label missing from the evaluated subset can still be answered.
    from toolkit.records import load_records

    labels = measure.label_set(load_records(ctx.upstream("collect"))) if cfg.metric == "gold" else None
    variants, do_system = select(ctx, discover(ctx))
    rows, notes = score_all(ctx, records, labels, variants, do_system, upstream_fingerprints(ctx))
    write_all(ctx, rows, notes, {"run": recipe.name, "n": len(records), "split": cfg.split})
    log_to_mlflow(ctx, rows)
    from toolkit.evaluate.report import headline

    return headline(rows)


def score_all(ctx, records: list[dict], labels, variants: list[Variant], do_system: bool, fps: dict,
              cascade: bool = True) -> tuple[list[dict], list[str]]:
    """Every variant (and the system) on the records: rows with quality intervals, the Pareto flag, and notes.
    Shared by the stage and `optkit evaluate BUNDLE` (toolkit/evaluate/bundle.py)."""
    cfg, recipe = ctx.config, ctx.recipe
    max_new = cfg.max_new_tokens or (recipe.collect.generation.max_new_tokens if recipe.collect else 64)
    judge = None
    if cfg.judge is not None:
        from toolkit.evaluate.judge import Judge

        judge = Judge(cfg.judge)
    rows, answers, notes = [], {}, []
    todo = [v for v in variants if not measurement_path(ctx, v, records, max_new, fps).is_file()]
    servers = early_servers(ctx, todo)
    try:
        # With servers starting in the background: first every answer (untimed), then wait until every server
        # is up (or has failed), so no timing below shares the CPU with a server's start.
        pre = {v.name: untimed_answers(ctx, v, records, max_new) for v in todo} if servers else {}
        for server in servers.values():
            try:
                server.wait()
            except OptkitError:
                pass  # server.error is reported in the variant's row (serving_error) by serve_variant
        for v in variants:
            row, scored = cached_variant(ctx, v, records, labels, max_new, judge, fps, pre.get(v.name),
                                         servers.get(v.name))
            rows.append(row)
            answers[v.name] = {s["id"]: s for s in scored}
            write_jsonl(ctx.dir / "outputs" / f"{v.name}.jsonl", scored)
    finally:
        for server in servers.values():
            server.stop()
        if judge is not None:
            judge.close()
    if do_system:  # + system-cascade (route.mode = cascade)
        sys_rows, sys_logs = system_row(ctx, records, answers, rows, labels, cascade)
        rows.extend(sys_rows)
        answers.update(sys_logs)
    measure.add_intervals(rows, answers)
    for row, flag in zip(rows, measure.pareto_flags(rows)):
        row["pareto"] = flag
    notes += [f"{r['variant']}: throughput above batch 1 not measured (llama-cpp-python serves one request at a "
              "time)" for r in rows if r.get("engine") == "llama.cpp"]
    notes += [f"{r['variant']}: transformers decompresses compressed-tensors weights on load here (CPU), so its "
              "latency and memory are those of the dequantized model, and its quality reflects the quantized "
              "weights but not activation quantization (W8A8's A8). vLLM runs the integer kernels." for r in rows
              if r.get("engine") == "transformers" and r.get("format") == "compressed-tensors"]
    notes += [f"{r['variant']}: not measured on its serving engine: {r['serving_error']}" for r in rows
              if r.get("serving_error")]
    if labels is None and cfg.metric == "gold":
        notes.append("no gold references in the evaluated split: quality is n/a; agreement with the teacher remains")
    return rows, notes


def write_all(ctx, rows: list[dict], notes: list[str], setup: dict) -> None:
    """variants.json/.csv, pareto.json, the two plots and report.md into ctx.dir."""
    from toolkit.evaluate.report import plot_latency, plot_quality_cost, write_report, write_tables

    cfg = ctx.config
    write_tables(ctx.dir, rows)
    plots = {"quality_vs_cost": plot_quality_cost(rows, ctx.dir / "quality_vs_cost.png", cfg.metric),
             "latency": plot_latency(rows, ctx.dir / "latency.png")}
    setup = {"metric": cfg.metric, "latency_n": min(cfg.latency_samples, setup["n"]), "warmup": cfg.warmup,
             "cpus": os.cpu_count(), "slo": cfg.slo, "student_dtype": dtype_name(student_dtype(ctx)),
             "teacher_dtype": dtype_name(ctx.recipe.teacher.dtype), **setup}
    write_report(ctx.dir, rows, setup, plots, notes)


def system_row(ctx, records, answers, rows, labels, with_cascade: bool = True
               ) -> tuple[list[dict], dict[str, dict[str, dict]]]:
    """(system rows, their per-request logs by variant and id); with_cascade=False skips the cascade replay
    (a bundle carries no student confidences for new prompts)."""
    from toolkit.evaluate.system import replay
    from toolkit.records import load_records

    cfg = ctx.config
    by_name = {r["variant"]: r for r in rows}
    pricing = ctx.recipe.pricing
    warm = load_records(ctx.upstream("collect"), [cfg.system.warm_split]) if cfg.system.warm_split else []
    student_price = measure.find_price(pricing, ("system", cfg.system.student, "student"))[1]
    overhead_rate = student_price.per_hour if student_price is not None and student_price.per_hour else 0.0
    prices = {name: measure.find_price(pricing, keys)[1] for name, keys in
              (("teacher", ("teacher",)), (cfg.system.student, (cfg.system.student, "student")))}

    def cost_of(name: str, answer: dict) -> Optional[float]:
        price = prices.get(name)
        if price is None:
            return None
        if price.per_hour is not None:
            return by_name[name].get("cost_per_request_usd")
        return measure.request_cost(price, answer["input_tokens"] or 0, answer["output_tokens"] or 0,
                                    cfg.prompt_cache_fraction)

    row, log_rows = replay(ctx, records, warm, answers, by_name, cost_of, overhead_rate, cfg.metric, labels)
    write_jsonl(ctx.dir / "outputs" / "system.jsonl", log_rows)
    logs = {row["variant"]: {r["id"]: r for r in log_rows}}
    from toolkit.evaluate.system import load_cascade

    cascade, confidence = load_cascade(ctx) if with_cascade else (None, {})
    if cascade is None:
        return [row], logs
    crow, clog = replay(ctx, records, warm, answers, by_name, cost_of, overhead_rate, cfg.metric, labels,
                        cascade=cascade, confidence=confidence)
    write_jsonl(ctx.dir / "outputs" / "system-cascade.jsonl", clog)
    logs[crow["variant"]] = {r["id"]: r for r in clog}
    return [row, crow], logs


def log_to_mlflow(ctx, rows: list[dict]) -> None:
    """One nested run per variant (the MLflow UI compares them side by side), plus the stage's files."""
    for row in rows:
        with ctx.tracker.run(f"variant:{row['variant']}", tags={"optkit.variant": row["variant"],
                                                               "optkit.stage": "evaluate"}):
            ctx.tracker.log_params({k: row[k] for k in ("variant", "source", "engine", "cost_basis", "price_key",
                                                        "method", "format") if row.get(k) is not None})
            ctx.tracker.log_metrics({k: float(v) for k, v in row.items()
                                     if isinstance(v, (int, float)) and v is not None})
    for name in ("report.md", "variants.csv", "variants.json", "pareto.json", "quality_vs_cost.png", "latency.png"):
        if (ctx.dir / name).is_file():
            ctx.log_artifact(ctx.dir / name)
