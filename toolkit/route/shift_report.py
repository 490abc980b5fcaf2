"""What the shift guard does to a set of prompts: share flagged, strong calls and quality with and without it.

Used by the route report (the in-domain test part, and `route.shift.eval_path` when given) and by
eval/bench_route.py's shift table.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from toolkit.route.runtime import decide


def effect(P: np.ndarray, S: Optional[np.ndarray], flags: np.ndarray, cost_norm: np.ndarray, strong: int,
           threshold: float, action: str, min_quality: Optional[float] = None) -> dict:
    """P: predicted qualities [n, M]; S: true scores [n, M] or None; flags: the guard's verdicts [n]."""
    choice = decide(P, cost_norm, threshold)
    guarded = np.where(flags, strong, choice) if action == "strong" else choice
    out = {"n": int(len(P)), "flagged": float(np.mean(flags)) if len(flags) else 0.0, "action": action}
    for name, c in (("without_guard", choice), ("with_guard", guarded)):
        row = {"strong_fraction": float(np.mean(c == strong)), "cost": float(cost_norm[c].mean())}
        if S is not None:
            strong_q = float(S[:, strong].mean())
            q = float(S[np.arange(len(S)), c].mean())
            row["quality"] = q
            row["quality_ratio"] = q / strong_q if strong_q > 0 else None
            if min_quality is not None and row["quality_ratio"] is not None:
                row["meets_goal"] = bool(row["quality_ratio"] >= min_quality)
        out[name] = row
    return out


def eval_set(ctx, cfg, models: list[str]) -> tuple[list[str], Optional[np.ndarray], str]:
    """(prompts, scores [n, M] or None, path) of route.shift.eval_path. Scores are read when the file has the
    label score columns of every model (route.labels.score_columns), else only routing shares are reported."""
    from toolkit.collect.prompts import read_data
    from toolkit.errors import OptkitError
    from toolkit.io import require_columns
    from toolkit.route.labels import _to_score

    path = ctx.recipe.resolve_path(cfg.shift.eval_path)
    if not path.exists():
        raise OptkitError(f"route.shift.eval_path: file not found: {path}")
    rows = read_data(path, field="route.shift.eval_path")
    column = cfg.shift.eval_prompt_column or cfg.labels.prompt_column
    require_columns(rows, [column], str(path), "route.shift.eval_prompt_column")
    prompts = [str(r.get(column) or "") for r in rows]
    cols = cfg.labels.score_columns
    S = None
    if cols and set(cols) == set(models) and all(all(c in r for c in cols.values()) for r in rows):
        S = np.array([[_to_score(r[cols[m]], f"{path}: row {i}: column '{cols[m]}'") for m in models]
                      for i, r in enumerate(rows, 1)], dtype=np.float64)
    ctx.add_input(path)
    return prompts, S, str(path)
