"""collect: send the recipe's prompts to the teacher and keep its answers (the records of toolkit/records.py).

setup (prompts, backend, result store) -> run (only prompts the store lacks, checked against the teacher's
context: toolkit.collect.context) -> save (outputs.jsonl, failures.jsonl, topk.safetensors, prompts.jsonl,
summary.json). Heavy imports live in the engines (toolkit.engines).

After a kill -9 nothing answered is lost (the result store is fsync'd per answer), but the requests that were
in flight are sent again: at most collect.openai.concurrency of them for the openai backend (the server may
have answered and billed them; their answers never reached the store), a batch or chunk for hf / vllm.
work/in_flight.log records them, and the next run counts them as `resent_after_interrupt` in summary.json
and the manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from toolkit.collect.backends import Request
from toolkit.errors import OptkitError
from toolkit.io import atomic_write_bytes, atomic_write_json, write_jsonl
from toolkit.redact import redact_text
from toolkit.records import FAILURES, OUTPUTS, TOPK

log = logging.getLogger("optkit.collect")

PROMPTS = "prompts.jsonl"
SUMMARY = "summary.json"
MAX_LABELS = 50  # references with at most this many distinct values are treated as class labels


# Recipe keys besides `collect` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: the teacher and its settings, the prompts, seed (splits, sampling). Not `pricing`: records carry token
# counts and evaluate prices them, so a price change never re-collects, nor re-trains the student downstream.
READS = ("teacher", "data", "seed")


@dataclass
class Collector:
    """The backends' sink: persists each answer at once, remembers failures, logs what is in flight, moves the
    progress bar."""

    store: object
    advance: Callable[[int], None]
    in_flight: object = None  # store.InFlightLog
    failures: dict = field(default_factory=dict)  # key -> (error, attempts)
    new: list = field(default_factory=list)  # keys answered in this run

    def started(self, request) -> None:
        if self.in_flight is not None:
            self.in_flight.started(request.key)

    def done(self, request, result: dict) -> None:
        self.store.put(request.key, result)
        if self.in_flight is not None:
            self.in_flight.settled(request.key)
        self.failures.pop(request.key, None)
        self.new.append(request.key)
        self.advance(1)

    def failed(self, request, error: str, attempts: int) -> None:
        if self.in_flight is not None:
            self.in_flight.settled(request.key)
        self.failures[request.key] = (error, attempts)
        log.warning("collect: prompt %s failed after %d attempt(s): %s", request.id, attempts, redact_text(error))
        self.advance(1)


def run(ctx) -> dict:
    from toolkit.collect.backends import generation_params, make_backend, resolve_backend
    from toolkit.collect.prompts import data_file, load_prompts
    from toolkit.collect.store import InFlightLog, ResultStore, result_key

    recipe, cfg = ctx.recipe, ctx.config
    if cfg.backend == "log":  # answers the teacher already gave (a traffic log): no model, no result store
        from toolkit.collect.log_source import run as run_log

        return run_log(ctx)
    # ---- setup
    data_path = data_file(recipe)
    ctx.add_input(data_path)
    teacher_dir = Path(recipe.teacher.model).expanduser()
    if teacher_dir.exists():  # a local teacher saved over in place runs again
        ctx.add_input(teacher_dir)
    prompts = load_prompts(recipe.data, data_path, recipe.seed)
    write_jsonl(ctx.dir / PROMPTS, (p.to_dict() for p in prompts))
    selected = [p for p in prompts if p.split in cfg.splits]
    if not selected:
        raise OptkitError(f"collect.splits {cfg.splits}: none of the {len(prompts)} prompts fall in these splits")
    name, why = resolve_backend(recipe, len(selected))  # `auto` -> an engine, once; its identity keys the store
    log.info("collect: backend %s (%s)", name, why)
    backend = make_backend(name, recipe)
    identity, params = backend.identity(), generation_params(recipe, name)
    sent = {p.id: p.messages for p in selected}  # the messages the teacher sees (after the context guard)

    def key(pid: str) -> str:
        return result_key(identity, sent[pid], params)

    # ---- run: only what the store lacks, each distinct request once
    with ResultStore(ctx.work_dir / "results.jsonl") as store:
        context = {"policy": cfg.context, "checked": False}
        todo_ids = [p.id for p in selected if key(p.id) not in store]
        if todo_ids:
            context, skipped = apply_context_guard(backend, recipe, todo_ids, sent)
            todo_ids = [i for i in todo_ids if i not in skipped and key(i) not in store]
        else:
            skipped = {}
        todo = list({key(i): Request(key(i), i, sent[i]) for i in todo_ids}.values())
        in_flight = InFlightLog(ctx.work_dir / "in_flight.log")
        resent = sum(1 for r in todo if r.key in in_flight.previous)
        log.info("collect: %d prompts, %d already answered, %d to send (%s backend)%s",
                 len(selected), len(selected) - len(todo) - len(skipped), len(todo), name,
                 f"; {resent} were in flight when the last run stopped and are sent again" if resent else "")
        started = time.perf_counter()
        try:
            with ctx.progress("teacher answers", len(todo)) as advance:
                sink = Collector(store, advance, in_flight)
                backend.generate(todo, sink)
        finally:
            backend.close()
            in_flight.close()
        wall = time.perf_counter() - started
        results = {p.id: store.get(key(p.id)) for p in selected}
        new_results = [store.get(k) for k in sink.new]

    # ---- save
    records, failures = [], []
    for p in selected:
        p.messages = sent[p.id]
        if results[p.id] is not None:
            records.append(make_record(p, results[p.id], recipe.teacher.model))
        else:
            error, attempts = sink.failures.get(key(p.id), (skipped.get(p.id, "not answered"), 0))
            failures.append({"id": p.id, "split": p.split, "prompt": p.prompt, "error": error, "attempts": attempts})
    write_jsonl(ctx.dir / OUTPUTS, records)
    write_jsonl(ctx.dir / FAILURES, failures)
    if cfg.top_logprobs:
        write_topk(ctx.dir / TOPK, records, results)
    else:  # an earlier run's top-k must not reach distill's kd.source: precomputed
        (ctx.dir / TOPK).unlink(missing_ok=True)
    summary = summarize(records, failures, new_results, wall, len(prompts), backend.stats)
    summary.update(backend={"requested": cfg.backend, "used": name, "why": why}, teacher=identity, context=context,
                   resent_after_interrupt=resent)
    atomic_write_json(ctx.dir / SUMMARY, summary)
    ctx.extra["backend"] = summary["backend"]
    ctx.extra["teacher"] = identity
    ctx.extra["context"] = context
    metrics = headline(summary)
    ctx.log_metrics(metrics)
    ctx.log_artifact(ctx.dir / SUMMARY)
    check_failures(len(failures) - len(skipped), len(selected), cfg.max_failures,
                   [f for f in failures if f["id"] not in skipped])
    if not records:
        raise OptkitError(f"collect: none of the {len(selected)} prompts was answered ({len(skipped)} skipped by "
                          f"the context guard, collect.context: {cfg.context}; {len(failures) - len(skipped)} "
                          f"failed, see {ctx.dir / FAILURES}): check collect.generation.max_new_tokens against the "
                          "teacher's context")
    return metrics


def apply_context_guard(backend, recipe, ids: list[str], sent: dict) -> tuple[dict, dict]:
    """Check the prompts about to be sent against the teacher's context (toolkit.collect.context); truncated
    prompts replace their messages in `sent`. Returns (summary facts, skipped id -> reason)."""
    from toolkit.collect.context import guard

    kept, report = guard(backend.load(), [(i, sent[i]) for i in ids], recipe.collect.generation.max_new_tokens,
                         recipe.collect.context)
    for pid, messages in kept:
        sent[pid] = messages
    return {**report.as_dict(), "checked": report.limit is not None}, report.skipped


def make_record(p, result: dict, model: str) -> dict:
    record = {**p.to_dict(), "output": result["output"], "finish_reason": result["finish_reason"],
              "input_tokens": int(result["input_tokens"]), "output_tokens": int(result["output_tokens"]),
              "latency_s": result["latency_s"], "model": model}
    if result.get("tokens_estimated"):
        record["tokens_estimated"] = True
    return record


def write_topk(path, records: list[dict], results: dict) -> None:
    """topk.safetensors as toolkit/records.py says: `<id>.ids` int32 [T, k], `<id>.logprobs` float16 [T, k]."""
    import numpy as np
    from safetensors.numpy import save

    tensors = {}
    for r in records:
        topk = results[r["id"]].get("topk")
        if not topk or not topk["ids"]:
            continue
        tensors[f"{r['id']}.ids"] = np.asarray(topk["ids"], dtype=np.int32)
        tensors[f"{r['id']}.logprobs"] = np.asarray(topk["logprobs"], dtype=np.float16)
    atomic_write_bytes(path, save(tensors, metadata={"format": "optkit-topk-v1"}))


def gold_accuracy(records: list[dict]) -> Optional[float]:
    """Share of records whose output names the reference (class labels when the references are few)."""
    from toolkit.metrics import gold_match

    scored = [r for r in records if r.get("reference")]
    if not scored:
        return None
    labels = sorted({r["reference"] for r in scored})
    labels = labels if len(labels) <= MAX_LABELS else None
    return sum(gold_match(r["output"], r["reference"], labels) for r in scored) / len(scored)


def summarize(records, failures, new_results, wall, n_prompts, stats) -> dict:
    by_split: dict[str, int] = {}
    for r in records:
        by_split[r["split"]] = by_split.get(r["split"], 0) + 1
    new_out = sum(int(r["output_tokens"]) for r in new_results)
    summary = {
        "prompts": n_prompts, "sent": len(records) + len(failures), "answered": len(records),
        "failed": len(failures), "by_split": by_split,
        "answered_this_run": len(new_results), "from_store": len(records) - len(new_results),
        "input_tokens": sum(r["input_tokens"] for r in records),
        "output_tokens": sum(r["output_tokens"] for r in records),
        "finish_reasons": _count(r["finish_reason"] for r in records),
        "wall_s": round(wall, 3),
        # Throughput of what was generated in this run (answers read from the store took no time).
        "output_tokens_per_s": round(new_out / wall, 3) if new_results and wall > 0 else None,
        "requests_per_s": round(len(new_results) / wall, 3) if new_results and wall > 0 else None,
        "teacher_gold_accuracy": gold_accuracy(records),
        "backend_stats": dict(stats),
    }
    return summary


def headline(summary: dict) -> dict:
    keys = ("answered", "failed", "input_tokens", "output_tokens", "output_tokens_per_s", "teacher_gold_accuracy",
            "answered_this_run")
    metrics = {k: summary[k] for k in keys if summary.get(k) is not None}
    metrics["retries"] = summary["backend_stats"].get("retries", 0)
    metrics["resent_after_interrupt"] = summary.get("resent_after_interrupt", 0)
    context = summary.get("context") or {}
    metrics.update(context_skipped=context.get("skipped", 0), context_truncated=context.get("truncated", 0))
    return metrics


def check_failures(n_failed: int, n_total: int, allowed: float, failures: list[dict]) -> None:
    if n_failed and n_failed / n_total > allowed:
        raise OptkitError(f"collect: {n_failed} of {n_total} prompts failed after retries (collect.max_failures = "
                          f"{allowed:g}); see failures.jsonl. First error: {' '.join(failures[0]['error'].split())}")


def _count(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
