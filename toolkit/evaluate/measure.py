"""Quality, latency, throughput and cost of one variant, and the Pareto set over all of them.

Definitions (the README and report.md repeat them):
- quality: mean task metric against the gold reference (evaluate.metric; gold = the answer names the gold label,
  the label set being the distinct references). agreement: the variant's answer names the same label as the
  teacher's (exact normalized match when there is no label set); agreement_f1: token F1 with the teacher.
- TTFT: request start (before tokenization) to the first generated token handed out by the engine.
- TPOT: (e2e - TTFT) / (output tokens - 1), vLLM's definition, which excludes the first token (GuideLLM calls
  this ITL; GuideLLM's own "TPOT" is e2e / output tokens and includes TTFT). ITL: gaps between tokens.
- e2e: request start to the last token; p50 / p95 / p99 over the timed requests (one at a time, batch 1).
- tokens/s at batch b: generated tokens (up to and including end-of-turn) / wall time, b requests per call.
- cost per 1M requests: API variants (token prices) = mean per-request token bill x 1e6; self-hosted variants
  (pricing.per_hour) = per_hour / 3600 / requests per second x 1e6, the requests/s being the best measured on
  the serving engine (toolkit.evaluate.serving) at a concurrency meeting evaluate.slo, else (no serving engine)
  the largest measured batch size in-process.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from toolkit.metrics import METRICS, exact_match, gold_match, label_agreement, token_f1


# ------------------------------------------------------------------------------------------ quality


def label_set(records: list[dict]) -> Optional[list[str]]:
    labels = sorted({r["reference"] for r in records if r.get("reference")})
    return labels or None


def task_score(pred: str, ref: Optional[str], metric: str, labels: Optional[list[str]]) -> Optional[float]:
    if not ref:
        return None
    if metric == "gold":
        return gold_match(pred, ref, labels)
    return METRICS[metric](pred, ref)


def agrees(pred: str, teacher: str, labels: Optional[list[str]]) -> float:
    # the same rule as distill's agreement_label (toolkit.metrics.label_agreement), so both stages agree
    if labels:
        return label_agreement(pred, teacher, labels)
    return exact_match(pred, teacher)


def score_rows(rows: list[dict], records: list[dict], metric: str, labels: Optional[list[str]]) -> list[dict]:
    """Per-prompt scores: rows[i] is the variant's answer to records[i]."""
    out = []
    for row, rec in zip(rows, records):
        out.append({"id": rec["id"], "output": row["output"], "output_tokens": row.get("output_tokens"),
                    "input_tokens": row.get("input_tokens"), "reference": rec.get("reference"),
                    "score": task_score(row["output"], rec.get("reference"), metric, labels),
                    "agree": agrees(row["output"], rec["output"], labels),
                    "agree_f1": token_f1(row["output"], rec["output"])})
    return out


def quality_summary(scored: list[dict]) -> dict:
    scores = [r["score"] for r in scored if r["score"] is not None]
    return {"n": len(scored), "quality": float(np.mean(scores)) if scores else None,
            "quality_n": len(scores),
            "agreement": float(np.mean([r["agree"] for r in scored])) if scored else None,
            "agreement_f1": float(np.mean([r["agree_f1"] for r in scored])) if scored else None,
            "output_tokens_mean": float(np.mean([r["output_tokens"] or 0 for r in scored])) if scored else None,
            "input_tokens_mean": float(np.mean([r["input_tokens"] or 0 for r in scored])) if scored else None}


def add_intervals(rows: list[dict], scored: dict[str, dict[str, dict]], teacher: str = "teacher") -> None:
    """95% intervals on every row with per-prompt scores (scored[variant][id] = {score, agree}): Wilson on its
    quality and agreement, and, on the same prompts as the teacher, the paired bootstrap difference and ratio of
    quality against the teacher (with the exact McNemar test for 0/1 scores) and the verdict they allow
    (toolkit.evaluate.stats)."""
    from toolkit.evaluate import stats

    ref = scored.get(teacher)
    for row in rows:
        mine = scored.get(row["variant"])
        if not mine:
            continue
        for key, field in (("quality", "score"), ("agreement", "agree")):
            ci = stats.mean_ci([s[field] for s in mine.values()])
            row[f"{key}_lo"], row[f"{key}_hi"] = ci if ci else (None, None)
        if ref is None or row["variant"] == teacher:
            continue
        ids = [i for i in mine if i in ref]
        cmp = stats.paired([mine[i]["score"] for i in ids], [ref[i]["score"] for i in ids])
        row.update({f"quality_{k}": v for k, v in cmp.items() if k != "n"})
        row["quality_paired_n"] = cmp["n"]
        row["quality_vs_teacher"] = stats.verdict(cmp["diff_lo"], cmp["diff_hi"], cmp["n"], cmp)


# ------------------------------------------------------------------------------------------ latency


def pct(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def samples(e2e: list[float], ttft: list[float]) -> dict:
    """The timed requests' means and the requests themselves: the system replay draws each routed request's
    latency from them, so the system's tail is its models' measured tail, not their means."""
    return {"e2e_mean_s": float(np.mean(e2e)) if e2e else None, "ttft_mean_s": float(np.mean(ttft)) if ttft else None,
            "e2e_samples_s": [float(x) for x in e2e], "ttft_samples_s": [float(x) for x in ttft]}


def latency_summary(timed: list) -> dict:
    ttft = [t.ttft_s for t in timed]
    e2e = [t.e2e_s for t in timed]
    tpot = [(t.e2e_s - t.ttft_s) / (t.output_tokens - 1) for t in timed if t.output_tokens > 1]
    itl = [g for t in timed for g in t.itl_s]
    tokens = sum(t.output_tokens for t in timed)
    return {"latency_n": len(timed),
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "tpot_p50_s": pct(tpot, 50), "tpot_mean_s": float(np.mean(tpot)) if tpot else None,
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "e2e_p50_s": pct(e2e, 50), "e2e_p95_s": pct(e2e, 95), "e2e_p99_s": pct(e2e, 99),
            **samples(e2e, ttft),
            "tokens_per_s_b1": tokens / sum(e2e) if sum(e2e) > 0 else None,
            "requests_per_s_b1": len(e2e) / sum(e2e) if sum(e2e) > 0 else None}


def timed_requests(engine, messages: list[list[dict]], warmup: int) -> list:
    """One request at a time (after `warmup` untimed ones): each request's Timed (TTFT, ITL, e2e, its answer)."""
    for m in messages[:1] * warmup:
        engine.timed(m)
    return [engine.timed(m) for m in messages]


def batch_movement(engine, messages: list[list[dict]], answers: list[dict], timed: list = ()) -> dict:
    """How many of the scored answers change when the same prompts are answered one at a time (batch 1): batched
    greedy decoding is not batch-invariant (padding and kernel shapes change the rounding), so this is measured on
    every run instead of assumed. The batch-1 answers are the timed requests' own where the engine returns them
    (one pass over the prompts serves latency and this check), else generated here."""
    if not getattr(engine, "batches", False) or not messages:
        return {}
    if timed and all(t.output is not None for t in timed):
        single = [t.output for t in timed]
    else:
        single = [r["output"] for r in engine.generate(messages, batch_size=1)]
    moved = sum((a or "").strip() != (b["output"] or "").strip() for a, b in zip(single, answers))
    return {"batch_moved": moved, "batch_moved_n": len(messages)}


def measure_throughput(engine, messages: list[list[dict]], batch_sizes: list[int]) -> dict:
    """tokens/s and requests/s at each batch size above 1 (batch 1 comes from the timed requests)."""
    out = {}
    for b in sorted(set(batch_sizes)):
        if b == 1 or not getattr(engine, "batches", False):
            continue
        # Whole batches only: the prompts repeated until there is at least one full batch of b.
        n = max(b, len(messages) // b * b)
        pool = (messages * (n // len(messages) + 1))[:n]
        tokens, seconds, reqs = 0, 0.0, 0
        for i in range(0, len(pool), b):
            rows, s = engine.run_batch(pool[i:i + b])
            tokens += sum(r["output_tokens"] for r in rows)
            seconds += s
            reqs += len(rows)
        out[f"tokens_per_s_b{b}"] = tokens / seconds if seconds else None
        out[f"requests_per_s_b{b}"] = reqs / seconds if seconds else None
    return out


def records_latency(records: list[dict]) -> dict:
    """API / vLLM teachers: e2e from collect's per-request wall times (no TTFT: collect did not stream)."""
    e2e = [float(r["latency_s"]) for r in records if r.get("latency_s") is not None]
    tokens = sum(int(r.get("output_tokens") or 0) for r in records)
    return {"latency_n": len(e2e), "e2e_p50_s": pct(e2e, 50), "e2e_p95_s": pct(e2e, 95), "e2e_p99_s": pct(e2e, 99),
            **samples(e2e, []),
            "tokens_per_s_b1": tokens / sum(e2e) if e2e and sum(e2e) > 0 else None,
            # collect's latency_s is a batch share for batched backends (vLLM): 1 / mean = its throughput.
            "requests_per_s_collect": len(e2e) / sum(e2e) if e2e and sum(e2e) > 0 else None}


def best_rps(row: dict) -> tuple[Optional[float], Optional[int]]:
    """Requests/s at the largest batch size measured (how a self-hosted server would be loaded)."""
    sizes = sorted((int(k.rsplit("_b", 1)[1]) for k in row if k.startswith("requests_per_s_b") and row[k]),
                   reverse=True)
    if sizes:
        return row[f"requests_per_s_b{sizes[0]}"], sizes[0]
    return row.get("requests_per_s_collect"), None  # a teacher known only from collect's records


# ------------------------------------------------------------------------------------------ cost


def find_price(pricing: dict, keys: tuple):
    for k in keys:
        if k in pricing:
            return k, pricing[k]
    return None, None


def request_cost(price, input_tokens: float, output_tokens: float, cached_fraction: float) -> float:
    """One API request's bill in USD."""
    cached_price = price.cached_input_per_1m if price.cached_input_per_1m is not None else price.input_per_1m
    return (input_tokens * (1 - cached_fraction) * price.input_per_1m + input_tokens * cached_fraction * cached_price
            + output_tokens * price.output_per_1m) / 1e6


def variant_cost(row: dict, price, key: Optional[str], scored: list[dict], cached_fraction: float,
                 slo: Optional[dict] = None) -> dict:
    """cost_per_request_usd, cost_per_1m_requests and how they were computed. Self-hosted variants measured on
    their serving engine (row["serving"]["levels"]) are priced at the best req/s meeting the SLO."""
    if price is None:
        return {"cost_per_request_usd": None, "cost_per_1m_requests": None,
                "cost_basis": "no pricing entry for this variant"}
    levels = (row.get("serving") or {}).get("levels")
    if price.per_hour is not None and levels:
        from toolkit.evaluate.serving import best_level

        best, why = best_level(levels, slo)
        engine = row["serving"].get("engine")
        if best is None:
            return {"cost_per_request_usd": None, "cost_per_1m_requests": None, "cost_status": "SLO not met",
                    "cost_basis": f"pricing.{key}.per_hour on {engine}: {why}"}
        usd = price.per_hour / 3600 / best["requests_per_s"]
        return {"cost_per_request_usd": usd, "cost_per_1m_requests": usd * 1e6, "cost_concurrency":
                best["concurrency"], "cost_basis": f"pricing.{key}.per_hour {price.per_hour:g} $/h / "
                f"{best['requests_per_s']:.3g} req/s on {engine} at concurrency {best['concurrency']} ({why})"}
    if price.per_hour is not None:
        rps, b = best_rps(row)
        if not rps:
            return {"cost_per_request_usd": None, "cost_per_1m_requests": None,
                    "cost_basis": f"pricing.{key}.per_hour but no measured throughput"}
        usd = price.per_hour / 3600 / rps
        return {"cost_per_request_usd": usd, "cost_per_1m_requests": usd * 1e6,
                "cost_basis": f"pricing.{key}.per_hour {price.per_hour:g} $/h / {rps:.3g} req/s at "
                              + (f"batch {b}" if b else "collect's batching")}
    bills = [request_cost(price, r["input_tokens"] or 0, r["output_tokens"] or 0, cached_fraction) for r in scored]
    usd = float(np.mean(bills)) if bills else None
    return {"cost_per_request_usd": usd, "cost_per_1m_requests": usd * 1e6 if usd is not None else None,
            "cost_basis": f"pricing.{key} token prices x measured tokens"}


# ------------------------------------------------------------------------------------------ Pareto


def pareto_flags(rows: list[dict], quality: str = "quality", cost: str = "cost_per_1m_requests") -> list[bool]:
    """True for rows no other row dominates (quality >= and cost <=, one of them strictly); rows missing
    either number are never on the frontier."""
    pts = [(r.get(quality), r.get(cost)) for r in rows]
    flags = []
    for i, (q, c) in enumerate(pts):
        if q is None or c is None:
            flags.append(False)
            continue
        dominated = any(q2 is not None and c2 is not None and q2 >= q and c2 <= c and (q2 > q or c2 < c)
                        for j, (q2, c2) in enumerate(pts) if j != i)
        flags.append(not dominated)
    return flags
