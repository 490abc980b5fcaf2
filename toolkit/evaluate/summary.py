"""`optkit report RUN` and `optkit compare RUN_A RUN_B`: read a run directory (manifests, recipe.yaml, the
evaluate table) and print plain text. Standard library + yaml only: these commands never load a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from toolkit.config import STAGE_ORDER
from toolkit.errors import OptkitError
from toolkit.ui import fmt

COMPARED = (("quality", "quality"), ("agreement", "agreement"), ("e2e_p50_s", "e2e p50 s"),
            ("ttft_p50_s", "TTFT p50 s"), ("tokens_per_s_b1", "tok/s b1"), ("cost_per_1m_requests", "$/1M req"))


def find_run(ref: str) -> Path:
    """A run directory from a path, a recipe file, or a run name under ./artifacts."""
    p = Path(ref)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from toolkit.config import load_recipe
        from toolkit.pipeline import run_dir_for

        p = run_dir_for(load_recipe(p))
    elif not p.exists() and (Path("artifacts") / ref).is_dir():
        p = Path("artifacts") / ref
    if not p.is_dir() or not (p / "recipe.yaml").is_file() and not any((p / s).is_dir() for s in STAGE_ORDER):
        raise OptkitError(f"{ref}: not a run directory (expected artifacts/<name>/ with recipe.yaml and stage dirs)")
    return p


def _manifest(run: Path, stage: str) -> Optional[dict]:
    path = run / stage / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _variants(run: Path) -> list[dict]:
    path = run / "evaluate" / "variants.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _fmt(v: Any) -> str:
    return fmt(v, digits=4, missing="-")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report_text(run: Path) -> str:
    out = [f"run: {run}"]
    stages = []
    for s in STAGE_ORDER:
        m = _manifest(run, s)
        if m is None:
            continue
        head = ", ".join(f"{k}={_fmt(v)}" for k, v in list(m.get("metrics", {}).items())[:4]
                         if isinstance(v, (int, float)) and "." not in k)
        stages.append([s, m.get("status", "?"), _fmt(m.get("seconds")), head])
    out += ["", _table(["stage", "status", "seconds", "metrics"], stages) if stages else "(no stage has run)"]
    rows = _variants(run)
    if rows:
        metric = rows[0].get("quality_metric", "quality")
        from toolkit.evaluate.report import vs_teacher, with_ci

        shown = [(k, h) for k, h in COMPARED if k not in ("quality", "agreement")]
        out += ["", f"variants (quality = {metric} on {rows[0].get('n')} held-out prompts, [95% interval]):",
                _table(["variant", "engine", "quality", "vs teacher (paired)", "agreement"] + [h for _, h in shown]
                       + ["pareto"],
                       [[r["variant"], str(r.get("engine", "")), with_ci(r, "quality"), vs_teacher(r),
                         with_ci(r, "agreement")] + [_fmt(r.get(k)) for k, _ in shown] + [_fmt(r.get("pareto"))]
                        for r in rows])]
        front = [r["variant"] for r in sorted((r for r in rows if r.get("pareto")),
                                              key=lambda r: r["cost_per_1m_requests"])]
        out.append(f"Pareto set (cheapest first): {', '.join(front) or '(none: add pricing)'}")
        out.append(f"full report: {run / 'evaluate' / 'report.md'}")
    bundle = run / "export" / "bundle" / "manifest.json"
    if bundle.is_file():
        out.append(f"bundle: {bundle.parent} (check with: optkit verify {bundle.parent})")
    return "\n".join(out)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _recipe(run: Path) -> dict:
    import yaml

    path = run / "recipe.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def compare_text(a: Path, b: Path) -> str:
    out = [f"A: {a}", f"B: {b}"]
    ra, rb = _flat(_recipe(a)), _flat(_recipe(b))
    changed = [[k, _fmt(ra.get(k)), _fmt(rb.get(k))] for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    out += ["", "recipe changes:", _table(["key", "A", "B"], changed) if changed else "(same recipe)"]
    stages = []
    for s in STAGE_ORDER:
        ma, mb = _manifest(a, s), _manifest(b, s)
        if ma is None and mb is None:
            continue
        same = bool(ma and mb and ma.get("fingerprint") and ma.get("fingerprint") == mb.get("fingerprint"))
        stages.append([s, (ma or {}).get("status", "-"), (mb or {}).get("status", "-"),
                       "same outputs" if same else "different"])
    out += ["", _table(["stage", "A", "B", "outputs"], stages) if stages else "(no stages)"]
    va = {r["variant"]: r for r in _variants(a)}
    vb = {r["variant"]: r for r in _variants(b)}
    rows = []
    for name in list(va) + [n for n in vb if n not in va]:
        for key, label in COMPARED:
            x, y = va.get(name, {}).get(key), vb.get(name, {}).get(key)
            if x is None and y is None:
                continue
            delta = _fmt(y - x) if isinstance(x, (int, float)) and isinstance(y, (int, float)) else "-"
            rows.append([name, label, _fmt(x), _fmt(y), delta])
    out += ["", "variants (B - A):", _table(["variant", "metric", "A", "B", "delta"], rows) if rows else
            "(neither run has an evaluate table)"]
    return "\n".join(out)
