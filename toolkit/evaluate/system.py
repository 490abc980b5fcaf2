"""The composed system replayed over held-out traffic: exact cache -> semantic cache -> router -> student or
teacher, one request at a time in a fixed order (by id), the cache filling as answers are produced.

Decisions are made on each record's `prompt` (data.prompt_column, what route and cache were fit on): the text the
gateway reads back out of a templated user turn (serve.yaml decision_text; toolkit/serve/decision_text.py).
Answers come from the variants' own evaluated answers for the same prompts, so the system's quality is what the
deployed system would have answered. Timing: the cache lookup and router decision are measured for real on each
request (the overhead); a miss adds the chosen model's mean measured e2e latency (and TTFT) at batch 1.
Cost: each request pays the overhead time at the serving machine's rate (pricing.system.per_hour, else the
student's) plus, on a miss, the chosen model's cost for that prompt (its own tokens for API models).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, Optional

import numpy as np

from toolkit.evaluate.measure import agrees, pct, task_score

log = logging.getLogger("optkit.evaluate")


def load_parts(ctx) -> tuple[Optional[object], Optional[object]]:
    """(Router or None, SemanticCache or None) from the finished route / cache stages."""
    cfg = ctx.config.system
    router = cache = None
    if ctx.recipe.route is not None and ctx.has_upstream("route"):
        from toolkit.route import Router

        router = Router.load(ctx.upstream("route"))
    if cfg.semantic_cache and ctx.recipe.cache is not None and ctx.has_upstream("cache"):
        from toolkit.cache import SemanticCache

        cache = SemanticCache.load(ctx.upstream("cache") / "cache.json")
    return router, cache


def model_for(router, choice: str, student: str) -> str:
    """Router model name -> variant: the teacher by name (or the router's strong model), else the student."""
    from toolkit.serve.decide import target_for  # the gateway's own mapping

    return target_for(router, choice, student)


def load_cascade(ctx) -> tuple[Optional[object], dict]:
    """(Cascade, id -> confidence of the student's answer) when the route stage ran in cascade mode."""
    if ctx.recipe.route is None or not ctx.has_upstream("route"):
        return None, {}
    from toolkit.route.cascade import CASCADE_JSON, CONFIDENCE_JSONL, Cascade

    route_dir = ctx.upstream("route")
    if not (route_dir / CASCADE_JSON).is_file():
        return None, {}
    from toolkit.io import read_jsonl

    conf = {r["id"]: r["confidence"] for r in read_jsonl(route_dir / CONFIDENCE_JSONL)}
    return Cascade.load(route_dir), conf


def timed(row: dict, what: str, rid: str) -> Optional[float]:
    """A latency of the model that answered: one of its timed requests, picked by the prompt's id (stable across
    runs), so the system's percentiles carry its models' measured spread; the mean when no samples were kept."""
    xs = row.get(f"{what}_samples_s")
    if xs:
        return xs[int(hashlib.sha256(str(rid).encode()).hexdigest()[:8], 16) % len(xs)]
    return row.get(f"{what}_mean_s")


def replay(ctx, records: list[dict], warm: list[dict], answers: dict[str, dict[str, dict]],
           rows: dict[str, dict], cost_of: Callable[[str, dict], Optional[float]], overhead_per_hour: float,
           metric: str, labels: Optional[list[str]], cascade=None, confidence: Optional[dict] = None
           ) -> tuple[dict, list[dict]]:
    """(summary row, per-request log). answers[variant][id] = scored answer row of that variant. With `cascade`
    (route.mode = cascade) the student answers every miss and the teacher too when the student's confidence
    (route's cascade_confidence.jsonl; none = escalate) is below the threshold: cost and latency add up."""
    cfg = ctx.config.system
    router, cache = load_parts(ctx)
    from toolkit.cache.exact import ExactStore
    from toolkit.serve.decide import EXACT, SEMANTIC, Decider

    # The gateway's decision path itself (toolkit/serve/decide.py): what is priced here is what serve does.
    decider = Decider(cache, router, ExactStore() if cfg.exact_cache else None,
                      target=lambda choice: model_for(router, choice, cfg.student), default=cfg.student,
                      cascade=cascade, escalate_to="teacher")
    if warm:
        decider.remember_many([r["prompt"] for r in warm], [r["output"] for r in warm])
    label = {EXACT: "exact", SEMANTIC: "semantic"}
    log_rows = []
    for rec in records:
        decision = decider.decide(rec["prompt"])
        served = label.get(decision.route, decision.route)
        answer = decision.answer
        overhead = decision.seconds
        model_row, first_cost, first_e2e = None, 0.0, 0.0
        if decision.escalate_to is not None and served in answers:  # cascade: the student has answered
            conf = (confidence or {}).get(rec["id"])
            if decider.escalates(float("nan") if conf is None else conf):
                first = answers[served][rec["id"]]
                first_cost, first_e2e = cost_of(served, first), timed(rows[served], "e2e", rec["id"]) or 0.0
                served = "teacher-escalated"
        if served == "teacher-escalated":
            model_row = answers["teacher"][rec["id"]]
            answer = model_row["output"]
            decider.remember(rec["prompt"], answer, decision=decision)
        elif served in answers:
            model_row = answers[served][rec["id"]]
            answer = model_row["output"]
            # Filling the cache happens after the answer is sent: not on the request's critical path.
            decider.remember(rec["prompt"], answer, decision=decision)
        model_cost, model_e2e, model_ttft = 0.0, 0.0, 0.0
        if model_row is not None:
            name = "teacher" if served == "teacher-escalated" else served
            model_cost = cost_of(name, model_row)
            model_e2e = timed(rows[name], "e2e", rec["id"]) or 0.0
            model_ttft = timed(rows[name], "ttft", rec["id"]) or model_e2e  # API teachers: no TTFT, use e2e
            if served == "teacher-escalated":  # the student's whole answer came first
                model_cost = None if model_cost is None or first_cost is None else model_cost + first_cost
                model_e2e, model_ttft = model_e2e + first_e2e, model_ttft + first_e2e
        e2e, ttft = overhead + model_e2e, overhead + model_ttft
        log_rows.append({
            "id": rec["id"], "served_by": served, "output": answer, "reference": rec.get("reference"),
            "score": task_score(answer, rec.get("reference"), metric, labels),
            "agree": agrees(answer, rec["output"], labels), "overhead_s": overhead, "e2e_s": e2e, "ttft_s": ttft,
            "cost_usd": None if model_cost is None else model_cost + overhead * overhead_per_hour / 3600,
        })
    row = summarize(log_rows, cfg.student, router is not None, cache is not None)
    if cascade is not None:
        n = len(log_rows)
        row.update({"variant": "system-cascade", "engine": row["engine"].replace("router", "cascade"),
                    "escalation_fraction": sum(r["served_by"] == "teacher-escalated" for r in log_rows) / n
                    if n else None, "cost_basis": row["cost_basis"] + "; cascade: the student always answers a "
                    "miss, the teacher too on an escalation (cost and latency add)",
                    "cascade_threshold": cascade.threshold,
                    "cascade_confidence_of": "the distilled student's answers (route/cascade_confidence.jsonl)"})
    return row, log_rows


def summarize(log_rows: list[dict], student: str, has_router: bool, has_cache: bool) -> dict:
    n = len(log_rows)
    served = [r["served_by"] for r in log_rows]
    scores = [r["score"] for r in log_rows if r["score"] is not None]
    costs = [r["cost_usd"] for r in log_rows]
    e2e = [r["e2e_s"] for r in log_rows]
    usd = float(np.mean(costs)) if costs and None not in costs else None
    return {
        "variant": "system", "source": "system",
        "engine": "+".join(p for p, on in (("cache", has_cache), ("router", has_router)) if on) + f" -> teacher/{student}",
        "n": n, "quality": float(np.mean(scores)) if scores else None, "quality_n": len(scores),
        "agreement": float(np.mean([r["agree"] for r in log_rows])) if n else None,
        "exact_hit_rate": served.count("exact") / n if n else None,
        "semantic_hit_rate": served.count("semantic") / n if n else None,
        "teacher_fraction": served.count("teacher") / n if n else None,
        "student_fraction": served.count(student) / n if n else None,
        "overhead_p50_s": pct([r["overhead_s"] for r in log_rows], 50),
        "overhead_p99_s": pct([r["overhead_s"] for r in log_rows], 99),
        "ttft_p50_s": pct([r["ttft_s"] for r in log_rows], 50),
        "e2e_p50_s": pct(e2e, 50), "e2e_p95_s": pct(e2e, 95), "e2e_p99_s": pct(e2e, 99),
        "e2e_mean_s": float(np.mean(e2e)) if e2e else None,
        "cost_per_request_usd": usd, "cost_per_1m_requests": usd * 1e6 if usd is not None else None,
        "cost_basis": "per request: cache/router time at the serving rate + the chosen model's cost on a miss"
        if usd is not None else "a chosen model has no pricing",
    }
