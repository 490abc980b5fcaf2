"""evaluate/ outputs: variants.json + variants.csv (one row per variant), pareto.json, quality_vs_cost.png,
latency.png and report.md."""

from __future__ import annotations

import csv
import io
import platform
from pathlib import Path
from typing import Optional

from toolkit.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from toolkit.ui import fmt

# Columns of the table, in order (rows may carry more: the JSON keeps everything).
COLUMNS = ("variant", "source", "engine", "latency_engine", "n", "quality", "quality_lo", "quality_hi",
           "quality_diff", "quality_diff_lo", "quality_diff_hi", "quality_ratio", "quality_ratio_lo",
           "quality_ratio_hi", "quality_vs_teacher", "agreement", "agreement_lo", "agreement_hi", "agreement_f1",
           "perplexity", "judge_score", "ttft_p50_s", "tpot_p50_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
           "tokens_per_s_b1", "requests_per_s_b1", "inproc_e2e_p50_s", "inproc_tokens_per_s_b1",
           "cost_per_1m_requests", "cost_status", "size_bytes", "memory_bytes", "pareto")

DEFINITIONS = """\
- **quality**: mean task metric ({metric}) against the gold reference on the held-out prompts, with its 95%
  interval in brackets (Wilson for a 0/1 score; bootstrap of the mean otherwise). **vs teacher**: the variant's
  quality minus the teacher's, and their ratio, on the same prompts, with paired-bootstrap 95% intervals
  (prompts resampled with both answers kept together). A variant is called **better** or **worse** only when
  the interval of the difference excludes 0 and, for a 0/1 score, the exact McNemar test on the prompts where
  only one of the two is right agrees (p < 0.05); otherwise it is *not distinguishable at n=...* whatever the
  point estimates say.
- **agreement**: the answer names the same label as the teacher's (normalized exact match without labels);
  **agreement_f1**: token F1 with the teacher's answer. **perplexity**: of the variant on the teacher's answers
  (teacher-forced, answer tokens incl. end-of-turn; transformers variants only).
- **TTFT**: request start (before tokenization) to the first generated token. **TPOT**: (e2e - TTFT) /
  (output tokens - 1), vLLM's definition (excludes the first token; GuideLLM calls this ITL, and its own TPOT
  is e2e / output tokens). **e2e** p50/p95/p99: request start to last token, one request at a time (batch 1).
  These come from the serving engine (vLLM / llama.cpp server, streamed, concurrency 1) where a variant was
  served (**latency engine**); the in-process engine's figures stay in the `inproc_*` columns.
- **tokens/s (batch b)**: generated tokens / wall time with b requests per generate call (llama.cpp: batch 1 only).
- **$ / 1M requests**: API variants = token prices x measured tokens; self-hosted = pricing.per_hour / the best
  requests/s on the serving engine at a concurrency meeting evaluate.slo ("SLO not met" when none does; without
  a serving engine, the in-process requests/s at the largest batch size). The system adds cache and router
  time at the serving rate and pays the chosen model only on a cache miss.
- **Pareto**: no other variant has quality >= and cost <= with one strictly better."""


def write_tables(out_dir: Path, rows: list[dict]) -> None:
    atomic_write_json(out_dir / "variants.json", rows)
    buf = io.StringIO()
    extra = sorted({k for r in rows for k in r if k not in COLUMNS and not isinstance(r[k], (dict, list))})
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS) + extra, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in list(COLUMNS) + extra})
    atomic_write_text(out_dir / "variants.csv", buf.getvalue())
    pareto = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["cost_per_1m_requests"])
    atomic_write_json(out_dir / "pareto.json", [{"variant": r["variant"], "quality": r["quality"],
                                                 "quality_lo": r.get("quality_lo"), "quality_hi": r.get("quality_hi"),
                                                 "cost_per_1m_requests": r["cost_per_1m_requests"]} for r in pareto])


def with_ci(row: dict, key: str) -> str:
    """'0.333 [0.22, 0.46]': a figure with its 95% interval (the figure alone when it has none)."""
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if row.get(key) is None or lo is None or hi is None:
        return fmt(row.get(key))
    return f"{fmt(row[key])} [{fmt(lo)}, {fmt(hi)}]"


def vs_teacher(row: dict) -> str:
    """'-0.06 [-0.15, 0.03], x0.85 [0.62, 1.09]: not distinguishable at n=60' (paired, against the teacher)."""
    if row.get("quality_diff") is None or row.get("quality_diff_lo") is None:
        return "-"
    d = f"{row['quality_diff']:+.3f} [{row['quality_diff_lo']:+.3f}, {row['quality_diff_hi']:+.3f}]"
    if row.get("quality_ratio") is not None and row.get("quality_ratio_lo") is not None:
        hi = row.get("quality_ratio_hi")
        d += f", x{row['quality_ratio']:.2f} [{row['quality_ratio_lo']:.2f}, {'inf' if hi is None else f'{hi:.2f}'}]"
    return f"{d}: {row.get('quality_vs_teacher')}"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_quality_cost(rows: list[dict], path: Path, metric: str) -> bool:
    pts = [r for r in rows if r.get("quality") is not None and r.get("cost_per_1m_requests") is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in pts:
        ax.scatter(r["cost_per_1m_requests"], r["quality"], s=60, marker="*" if r.get("pareto") else "o",
                   color="tab:red" if r.get("pareto") else "tab:blue", zorder=3)
        if r.get("quality_lo") is not None and r.get("quality_hi") is not None:  # the 95% interval, not decoration
            ax.errorbar(r["cost_per_1m_requests"], r["quality"], capsize=3, color="grey", zorder=2,
                        yerr=[[r["quality"] - r["quality_lo"]], [r["quality_hi"] - r["quality"]]])
        ax.annotate(r["variant"], (r["cost_per_1m_requests"], r["quality"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["cost_per_1m_requests"])
    if len(front) > 1:
        ax.step([r["cost_per_1m_requests"] for r in front], [r["quality"] for r in front], where="post",
                color="tab:red", alpha=0.6, label="Pareto frontier")
        ax.legend(fontsize=8)
    costs = [r["cost_per_1m_requests"] for r in pts]
    if min(costs) > 0 and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("$ per 1M requests (lower is better)")
    ax.set_ylabel(f"quality: {metric} (higher is better; bars: 95% interval)")
    ax.set_title("Quality vs cost")
    ax.grid(alpha=0.3)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)
    return True


def plot_latency(rows: list[dict], path: Path) -> bool:
    pts = [r for r in rows if r.get("e2e_p50_s") is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [("TTFT p50", "ttft_p50_s"), ("e2e p50", "e2e_p50_s"), ("e2e p95", "e2e_p95_s"), ("e2e p99", "e2e_p99_s")]
    x = np.arange(len(pts))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(pts)), 4.5))
    for i, (label, key) in enumerate(series):
        ax.bar(x + i * width, [r.get(key) or 0 for r in pts], width, label=label)
    ax.set_xticks(x + width * (len(series) - 1) / 2, [r["variant"] for r in pts], rotation=30, ha="right")
    ax.set_ylabel("seconds (batch 1)")
    ax.set_title("Latency per variant")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)
    return True


def batch_line(rows: list[dict]) -> list[str]:
    """How much batching moved the scored answers (re-answered one at a time on the latency prompts)."""
    moved = [f"{r['variant']} {r['batch_moved']}/{r['batch_moved_n']}" for r in rows if r.get("batch_moved_n")]
    if not moved:
        return []
    return ["Answers that change when re-generated alone (batch 1) instead of in their batch, on the latency "
            f"prompts: {', '.join(moved)}. Greedy decoding is not batch-invariant; a change that flips a label "
            "moves quality by 1/n.", ""]


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for _, k in cols) + " |")
    return lines


def tail_line(n: int) -> list[str]:
    """Percentiles of a few timed requests are their largest ones, interpolated (numpy's linear rule): say so."""
    if not n or n > 100:
        return []
    which = "p95 and p99" if n <= 21 else "p99"  # 0.95 (n - 1) >= n - 2 up to n = 21
    w = 0.99 * (n - 1) % 1
    return [f"Latency {which} of {n} timed requests lie between the two slowest of them (p99 = {w:.2f} x the "
            f"slowest + {1 - w:.2f} x the second slowest): read them as the maximum seen, not as a tail estimate. "
            "The system row draws each routed request's latency from its model's timed requests."]


def write_report(out_dir: Path, rows: list[dict], setup: dict, plots: dict[str, bool], notes: list[str]) -> None:
    import torch

    metric = setup["metric"]
    shown = {}
    for r in rows:
        if r.get("cost_status") and r.get("cost_per_1m_requests") is None:
            r["cost_shown"] = r["cost_status"]
        else:
            r["cost_shown"] = r.get("cost_per_1m_requests")
        shown[r["variant"]] = {"quality_shown": with_ci(r, "quality"), "agreement_shown": with_ci(r, "agreement"),
                               "vs_teacher": vs_teacher(r)}
    main = [("variant", "variant"), ("engine", "engine"), ("latency engine", "latency_engine"),
            (f"{metric} [95% CI]", "quality_shown"), ("vs teacher (paired 95% CI)", "vs_teacher"),
            ("agreement [95% CI]", "agreement_shown"),
            ("ppl on teacher", "perplexity"), ("judge", "judge_score"), ("TTFT p50 s", "ttft_p50_s"),
            ("TPOT p50 s", "tpot_p50_s"), ("e2e p50 s", "e2e_p50_s"), ("e2e p95 s", "e2e_p95_s"),
            ("e2e p99 s", "e2e_p99_s"), ("$ / 1M req", "cost_shown"), ("Pareto", "pareto")]
    tput_keys = sorted({k for r in rows for k in r if k.startswith("tokens_per_s_b")},
                       key=lambda k: int(k.rsplit("b", 1)[1]))
    size = [("variant", "variant"), ("disk MB", "size_mb"), ("weights in memory MB", "memory_mb")] + \
        [(f"tok/s b{k.rsplit('b', 1)[1]}", k) for k in tput_keys]
    for r in rows:
        r["size_mb"] = r["size_bytes"] / 1e6 if r.get("size_bytes") else None
        r["memory_mb"] = r["memory_bytes"] / 1e6 if r.get("memory_bytes") else None
    table_rows = [{**r, **shown[r["variant"]]} for r in rows]
    lines = [
        f"# Evaluation: {setup['run']}",
        "",
        f"{setup['n']} held-out prompts of the `{setup['split']}` split (quality; teacher at "
        f"{setup.get('teacher_dtype', 'auto')}, every student variant at {setup.get('student_dtype', 'auto')}); "
        f"latency on {setup['latency_n']} "
        f"prompts one at a time after {setup['warmup']} warm-up request(s). Machine: {platform.machine()}, "
        f"{setup['cpus']} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads. Timings on a "
        "shared machine are noisy: compare variants measured in the same run, not across runs.",
        "",
        *_table(table_rows, main),
        "",
        "Quality intervals are 95%: Wilson (rates), paired bootstrap against the teacher on the same prompts; "
        "better/worse only where the paired interval of the difference excludes 0 and, for 0/1 scores, the exact "
        "McNemar test agrees.",
        *tail_line(setup["latency_n"]),
        "",
        *batch_line(rows),
        "Size and throughput:",
        "",
        *_table(rows, size),
        "",
    ]
    lines += serving_section(rows, setup.get("slo"))
    sysrow = next((r for r in rows if r["variant"] == "system"), None)
    if sysrow:
        lines += ["## The composed system", "",
                  f"Exact-cache hits {fmt(sysrow.get('exact_hit_rate'))}, semantic-cache hits "
                  f"{fmt(sysrow.get('semantic_hit_rate'))}, sent to the teacher {fmt(sysrow.get('teacher_fraction'))}, "
                  f"to the student {fmt(sysrow.get('student_fraction'))}; cache + router overhead p50 "
                  f"{fmt(sysrow.get('overhead_p50_s'))} s, p99 {fmt(sysrow.get('overhead_p99_s'))} s.", ""]
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["cost_per_1m_requests"])
    lines += ["## Pareto set (quality vs cost)", ""]
    lines += [f"- **{r['variant']}**: {metric} {with_ci(r, 'quality')} at ${fmt(r['cost_per_1m_requests'])} per 1M "
              "requests" for r in front] or ["- (no variant has both a quality and a cost: add pricing to the recipe)"]
    if front:
        lines += ["", "The frontier is drawn on point estimates; two variants whose quality intervals overlap are "
                  "not shown to differ in quality (see the paired comparison above)."]
    lines += ["", "Cost basis per variant:", ""]
    lines += [f"- {r['variant']}: {r.get('cost_basis', 'n/a')}" for r in rows]
    if plots.get("quality_vs_cost"):
        lines += ["", "![quality vs cost](quality_vs_cost.png)"]
    if plots.get("latency"):
        lines += ["", "![latency](latency.png)"]
    lines += ["", "## Definitions", "", DEFINITIONS.format(metric=metric)]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def headline(rows: list[dict]) -> dict:
    """Stage metrics: quality, cost and e2e p50 per variant (flat names for the manifest and MLflow)."""
    out: dict[str, Optional[float]] = {"variants": len(rows), "pareto_size": sum(bool(r.get("pareto")) for r in rows)}
    for r in rows:
        for key in ("quality", "quality_lo", "quality_hi", "quality_diff_lo", "quality_diff_hi", "agreement",
                    "cost_per_1m_requests", "e2e_p50_s"):
            if r.get(key) is not None:
                out[f"{r['variant']}.{key}"] = r[key]
    return out


def serving_section(rows: list[dict], slo: Optional[dict]) -> list[str]:
    """One table row per served variant x concurrency level, plus a row for each variant its engine could not
    serve (the reason shown, not hidden)."""
    served = [r for r in rows if r.get("serving")]
    if not served:
        return []
    cols = [("variant", "variant"), ("engine", "engine"), ("concurrency", "concurrency"), ("requests", "requests"),
            ("TTFT p50 s", "ttft_p50_s"), ("TPOT p50 s", "tpot_p50_s"), ("ITL p50 s", "itl_p50_s"),
            ("e2e p50 s", "e2e_p50_s"), ("e2e p95 s", "e2e_p95_s"), ("e2e p99 s", "e2e_p99_s"),
            ("out tok/s", "output_tokens_per_s"), ("req/s", "requests_per_s")]
    table = []
    for r in served:
        s = r["serving"]
        if s.get("error"):
            table.append({"variant": r["variant"], "engine": s.get("engine"), "concurrency": "not served",
                          "requests": s["error"][:160]})
        for lv in s.get("levels") or []:
            table.append({"variant": r["variant"], "engine": s.get("engine"), **lv})
    bound = ", ".join(f"{k} <= {v:g}" for k, v in (slo or {}).items()) or "none (best req/s measured)"
    return ["## Serving engines (concurrency sweep)", "",
            f"Each variant on the server that will serve it, streamed /v1/completions, same prompts and output "
            f"budget; SLO for the self-hosted cost: {bound}.", "", *_table(table, cols), ""]
