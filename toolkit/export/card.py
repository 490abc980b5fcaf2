"""The bundle's model card (README.md): what is inside, how to serve it, the measured numbers and their limits."""

from __future__ import annotations

from pathlib import Path

from toolkit.ui import fmt


def _size(root: Path, rel: str) -> int:
    p = root / rel
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _contents(manifest: dict, root: Path) -> list[str]:
    lines = ["| name | kind | path | quantization | size (MB) |", "|---|---|---|---|---|"]
    for m in manifest["models"]:
        lines.append(f"| {m['name']} | {m['kind']} | `{m['path']}` | {m.get('quantization') or m.get('method') or '-'} "
                     f"| {_size(root, m['path']) / 1e6:.1f} |")
    if manifest.get("router"):
        lines.append(f"| router | router | `{manifest['router']}/` | - | {_size(root, manifest['router']) / 1e6:.2f} |")
    if manifest.get("cache"):
        lines.append(f"| cache | cache config | `{manifest['cache']}` | - | {_size(root, manifest['cache']) / 1e6:.2f} |")
    return lines


def _measured(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No evaluate stage ran for this bundle: no measured numbers. Add an `evaluate:` section to the "
                "recipe to measure quality, latency and cost before deploying."]
    from toolkit.evaluate.report import vs_teacher, with_ci  # light: stdlib + toolkit.io/ui

    metric = rows[0].get("quality_metric", "quality")
    lines = [f"| variant | engine | {metric} | 95% CI | vs teacher (paired 95% CI) | agreement w/ teacher [95% CI] "
             "| e2e p50 (s) | e2e p95 (s) | tokens/s (batch 1) | $ / 1M requests | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{fmt(r['quality_lo'])}, {fmt(r['quality_hi'])}]" if r.get("quality_lo") is not None else "-"
        lines.append(f"| {r['variant']} | {r.get('engine', '-')} | {fmt(r.get('quality'))} | {ci} | {vs_teacher(r)} "
                     f"| {with_ci(r, 'agreement')} "
                     f"| {fmt(r.get('e2e_p50_s'))} | {fmt(r.get('e2e_p95_s'))} | {fmt(r.get('tokens_per_s_b1'))} "
                     f"| {fmt(r.get('cost_per_1m_requests'))} | {'yes' if r.get('pareto') else ''} |")
    return lines


def _widest(rows: list[dict]) -> str:
    """The widest quality interval, said plainly: how far apart two variants must be before n tells them apart."""
    widths = [(r["quality_hi"] - r["quality_lo"], r["variant"]) for r in rows
              if r.get("quality_lo") is not None and r.get("quality_hi") is not None]
    if not widths:
        return "no interval was computed (no per-prompt quality)."
    w, name = max(widths)
    return f"the widest ({name}) spans {w:.2f}, so differences smaller than that are not established."


def _short(text: str, keep: int = 400) -> str:
    """An error for a card line: its head (what failed) and its tail (the server log's cause), one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= keep else f"{text[:keep // 2]} … {text[-keep // 2:]}"


def _limits(manifest: dict, rows: list[dict]) -> list[str]:
    recipe = manifest["recipe"]
    n = max((r.get("n") or 0 for r in rows), default=0)
    ev = recipe.get("evaluate") or {}
    lines = [] if not recipe.get("data") else [  # no data: a route-only / cache-only bundle measured no variant
        f"- Quality is measured on {n} held-out prompts of the `{ev.get('split', 'test')}` split of "
        f"`{recipe['data']['path']}`: the numbers hold for traffic like that data, not for other "
        f"tasks. Brackets are 95% intervals (Wilson; paired bootstrap against the teacher): {_widest(rows)} A "
        "variant is called better or worse than the teacher only where its paired interval excludes 0 (and, for "
        "0/1 scores, the exact McNemar test agrees).",
        "- Latency and throughput were measured on the machine that ran the evaluation, with the engine named "
        "per row (transformers / llama.cpp), one process at a time; on a shared or different machine they "
        "change. They are not vLLM numbers unless the engine says vllm.",
        "- Cost for self-hosted variants = pricing.per_hour / measured requests per second at the largest "
        "batch size; API variants use the token prices of the recipe. Prices are the recipe's, not quotes.",
    ]
    for r in rows:  # a serve.sh line that failed where it was measured must not read as ready to use
        if r.get("serving_error"):
            lines.append(f"- `{r['variant']}` could not be served by {r.get('serving_engine') or 'its engine'} on the "
                         f"machine that ran the evaluation, so its figures are in-process ones and `./serve.sh "
                         f"{r['variant']}` is expected to fail on a machine like it: {_short(r['serving_error'])}")
    if manifest.get("cache"):
        lines.append("- The semantic cache's false-hit bound (cache.json) holds for queries like its tuning pairs and "
                     "only with the same embedder; the cache refuses a different embedder.")
    if manifest.get("router"):
        lines.append("- The router's quality target (route/router.json) was calibrated on the val split; its "
                     "guarantee is statistical and assumes the same prompt distribution.")
    if recipe.get("teacher"):  # a route-only or cache-only recipe has none
        lines.append(f"- Teacher: `{recipe['teacher']['model']}`. Check the licences of the teacher model and of the "
                     "data before redistributing weights trained on their outputs.")
    return lines


def model_card(manifest: dict, root: Path) -> str:
    rows = manifest.get("metrics") or []
    models = manifest["models"]
    serve_names = [m["name"] for m in models if m["kind"] == "hf"]
    parts = [
        f"# {manifest['run']}: optimized model bundle",
        "",
        f"Exported by optkit {manifest['optkit']} on {manifest['created_at']}. "
        f"{manifest['recipe'].get('description') or ''}".rstrip(),
        "",
        "## Contents",
        "",
        *_contents(manifest, root),
        "",
        "## Serve",
        "",
        "```bash",
        "optkit verify .          # every file against manifest.json (exit 1 on any mismatch)",
        *[f"./serve.sh {n}" for n in serve_names[:3]],
        *([] if models else ["OPTKIT_<BACKEND>_URL=... ./serve.sh gateway   # serve.yaml's backends run elsewhere"]),
        "```",
        "",
        "`serve.sh` holds the exact `vllm serve` lines (LoRA adapters via `--enable-lora --lora-modules`) and the "
        "Ollama / llama.cpp commands for the GGUF files. The router and cache load with the runtime only:",
        "",
        "```python",
        "from toolkit.bundle import Bundle",
        "b = Bundle.open('.')            # files are checked against their sha256 before loading",
        "router, cache = b.router(), b.cache()",
        "```",
        "",
        "## Measured",
        "",
        *_measured(rows),
        "",
        "## Limits",
        "",
        *_limits(manifest, rows),
    ]
    if manifest.get("notes"):
        parts += ["", "## Notes", "", *[f"- {n}" for n in manifest["notes"]]]
    return "\n".join(parts) + "\n"
